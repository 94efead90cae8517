"""Request: the engine's mutable record of one sequence, from waiting to finished."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.multimodal.items import MRopePositions, MultiModalItem


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Blocks are allocated and another worker's KV is being written into them.
    WAITING_FOR_KV = "waiting_for_kv"
    # Finished after prefill; blocks stay pinned until the KV is exported and released.
    HOLDING_KV = "holding_kv"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


class Request:
    """One sequence. `num_computed_tokens` counts tokens whose KV is in the cache."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_ids: tuple[int, ...] = (),
        prompt: str | None = None,
        seed: int | None = None,
        parent_id: str | None = None,
        index: int = 0,
        hold_kv: bool = False,
        mm_items: tuple["MultiModalItem", ...] = (),
        mrope: "MRopePositions | None" = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache on first schedule
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the full blocks, grows as blocks fill
        self.hold_kv = hold_kv
        self.mm_items = mm_items  # images in the prompt, in order (engine.multimodal)
        self.mm_spans = tuple(item.span for item in mm_items)
        self.mrope = mrope  # multimodal rotary positions (None: position = token index)
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.output_text = ""
        self.new_token_ids: tuple[int, ...] = ()  # what the latest step added, for streaming
        self.new_text = ""
        self.sent_text_len = 0  # output_text[:sent_text_len] has been handed out as new_text
        self.pending_first_token: int | None = None  # sampled by the prefill engine, applied after KV import
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def rope_positions(self, start: int, end: int) -> torch.Tensor | None:
        """[3, end - start] multimodal rotary positions of tokens start..end-1, None for a
        request without them. Tokens after the prompt sit at index + delta on every axis."""
        if self.mrope is None:
            return None
        n = self.num_prompt_tokens
        parts = []
        if start < n:
            if self.mrope.positions is None:
                raise ValueError(f"request {self.request_id!r} must recompute prompt tokens whose images this "
                                 f"engine never had (its KV came from another worker)")
            parts.append(self.mrope.positions[:, start : min(end, n)])
        if end > n:
            tail = torch.arange(max(start, n), end, dtype=torch.long) + self.mrope.delta
            parts.append(tail.expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def step_generator(self) -> torch.Generator | None:
        """The generator for the next sampled token, seeded from (seed, tokens generated so far):
        the continuation depends only on the sequence, so a request resumed elsewhere with the
        same output so far samples what it would have sampled here."""
        if self.generator is not None:
            self.generator.manual_seed((self.seed * 1_000_003 + self.num_output_tokens) % (1 << 63))
        return self.generator

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
