"""What the engine returns: vLLM-shaped, immutable snapshots of a request's progress."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: tuple[dict[int, float], ...] | None = None
    new_token_ids: tuple[int, ...] = ()  # produced by the step that made this snapshot
    new_text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_cached_tokens: int = 0
    kv_held: bool = False  # prefill done, blocks pinned for export (hold_kv requests)
