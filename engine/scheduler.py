"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step:
1. Running requests first, in arrival order: each gets the tokens it still has to compute
   (1 for a decode, the rest of its prompt or a chunk of it for a prefill), within the budget.
   When the pool has no block for one, the most recently arrived running request is preempted:
   its blocks are freed and it goes back to the front of the waiting queue to be recomputed.
2. Waiting requests next, while budget, sequence slots and blocks allow; their prompt is first
   matched against the prefix cache so that only the uncached tail is computed.
A request samples a token only in a step that completes all its known tokens, so prefill,
chunked prefill, decode and recompute after preemption are the same code path.

Images count too: a chunk that reaches an image whose encoder output is not cached runs the
vision encoder over the whole image, so each step has an encoder budget (image tokens,
`SchedulerConfig.encoder_budget`) besides the token budget. A chunk that would overrun it stops
before that image (or waits a step when the image is where it starts). An image larger than the
whole encoder budget still runs, alone, so it never starves.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so a token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues: `add / schedule / update_after_step / finish / abort`."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 encoder_cached: Callable[[int], bool] | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Whether an image's encoder output is cached (by content hash): the model runner knows.
        self.encoder_cached = encoder_cached or (lambda content_hash: False)
        self._encoding: set[int] = set()  # images this step's schedule encodes
        self._encoder_left = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Admit a request whose KV is already in its blocks (imported from another engine)."""
        if len(self.running) < self.config.max_num_seqs:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        else:
            req.status = RequestStatus.WAITING
            self._insert_front(req)

    def _insert_front(self, req: Request) -> None:
        """Queue `req` at the head of `waiting`, but behind the requests that hold blocks.

        Requests holding blocks (imported KV over the sequence limit) form the head of the
        queue: they need few or no new blocks, and a block-less request ahead of them could
        starve forever on the very blocks they hold. Preempted requests inserted one after
        another land in front of each other, which keeps their arrival order.
        """
        i = 0
        while i < len(self.waiting) and self.waiting[i].block_ids:
            i += 1
        self.waiting.insert(i, req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _fit_encoder(self, req: Request, start: int, num_new: int) -> int:
        """`num_new` cut so that the images the chunk [start, start + num_new) must encode fit the
        step's encoder budget (which they then take)."""
        if not req.mm_items:
            return num_new
        for item in req.mm_items:
            if item.offset >= start + num_new or item.end <= start or item.pixel_values is None:
                continue  # outside the chunk, or no pixels here (its KV came with the request)
            h = item.content_hash
            if h in self._encoding or self.encoder_cached(h):
                continue
            alone = len(self._encoding) == 0 and self._encoder_left == self.config.encoder_budget
            if item.length > self._encoder_left and not alone:
                return max(0, item.offset - start)
            self._encoding.add(h)
            self._encoder_left -= min(item.length, self._encoder_left)
        return num_new

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        self._encoding = set()
        self._encoder_left = self.config.encoder_budget

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            num_new = self._fit_encoder(req, req.num_computed_tokens, num_new)
            if num_new == 0:  # its next chunk starts at an image the encoder has no room for
                i += 1
                continue
            while not self.block_manager.allocate(req, req.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it can run either

        # New admissions wait while the pool is under pressure (a preemption happened).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            req = self.waiting[0]
            cached: list[int] = []
            hashes: list[int] = []
            looked_up = not req.block_ids
            if looked_up:
                cached, hashes = self.block_manager.lookup_prefix(req.all_token_ids, req.mm_spans)
                num_computed = len(cached) * self.block_manager.block_size
            else:
                num_computed = req.num_computed_tokens
            num_new = self._fit_encoder(req, num_computed, min(req.num_tokens - num_computed, budget))
            if num_new == 0 or not self.block_manager.allocate(req, num_computed + num_new, cached, hashes):
                break
            self.waiting.popleft()
            if looked_up:
                self.block_manager.record_prefix_lookup(req.num_tokens, len(cached))
            if req.num_computed_tokens == 0 and req.num_preemptions == 0:
                req.num_cached_tokens = num_computed
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self._insert_front(req)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.request)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Take a request out of the queues; free its blocks unless it holds its KV for export."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        if status is not RequestStatus.HOLDING_KV:
            self.block_manager.free(req)
