"""What the engine returns: vLLM-shaped, immutable snapshots of a request's progress."""
from __future__ import annotations

from dataclasses import dataclass, replace


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


def coalesce(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One snapshot standing for two consecutive ones of the same request: `later`'s state with
    the deltas (new tokens and text) of both, so a consumer that fell behind the engine gets one
    message for several steps instead of one per step."""
    if earlier.request_id != later.request_id:
        raise ValueError(f"cannot coalesce snapshots of {earlier.request_id!r} and {later.request_id!r}")
    by_index = {c.index: c for c in earlier.outputs}
    outputs = []
    for c in later.outputs:
        e = by_index.get(c.index)
        if e is not None:
            c = replace(c, new_token_ids=e.new_token_ids + c.new_token_ids, new_text=e.new_text + c.new_text)
        outputs.append(c)
    return replace(later, outputs=tuple(outputs))
