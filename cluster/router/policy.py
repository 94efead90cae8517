"""Picking workers: pure functions of the router's view of them (no I/O, deterministic).

Prefill: the worker that will start computing this prompt soonest, in tokens: the prompt blocks
it does not already hold in its prefix cache plus the prefill work already queued there.
Decode: among the workers that can hold the sequence, the one with the most free KV (as a
fraction, in 5% steps so that near-equal memory does not override load), then the fewest running
and waiting sequences; if none can, the one with the most free blocks. Ties break on the router's
in-flight count, then on worker_id.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.errors import NoWorkerError

KV_STEPS = 20  # free-KV fraction buckets for pick_decode (5% each)


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    role: str
    address: str
    epoch: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    queued_prefill_tokens: int
    inflight: int  # router-side: requests sent to it and not finished

    @property
    def kv_free_fraction(self) -> float:
        return self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


def prefill_cost(worker: WorkerView, overlap_blocks: int, prompt_blocks: int, block_size: int,
                 w_overlap: float = 1.0) -> float:
    """Tokens this worker must get through before it finishes our prompt's prefill."""
    to_compute = max(prompt_blocks - overlap_blocks, 0)
    return w_overlap * to_compute * block_size + worker.queued_prefill_tokens


def pick_prefill(workers: Sequence[WorkerView], overlap_blocks: Mapping[str, int], prompt_blocks: int,
                 block_size: int, w_overlap: float = 1.0) -> WorkerView:
    """The cheapest prefill worker; `overlap_blocks[worker_id]` is its cached prefix length in blocks."""
    if not workers:
        raise NoWorkerError("no ready prefill worker")
    return min(workers, key=lambda w: (
        prefill_cost(w, overlap_blocks.get(w.worker_id, 0), prompt_blocks, block_size, w_overlap),
        w.inflight, w.worker_id))


def pick_decode(workers: Sequence[WorkerView], blocks_needed: int) -> WorkerView:
    """The decode worker with the most free KV, then the fewest running, among those that fit.

    `blocks_needed` is the worst case (prompt + max_tokens); most sequences stop well before it,
    so when no worker fits it the one with the most free blocks still gets the sequence and its
    scheduler queues it until blocks free up, rather than failing a request whose first token
    the client already has.
    """
    if not workers:
        raise NoWorkerError("no ready decode worker")
    fits = [w for w in workers if w.num_free_blocks >= blocks_needed]
    if not fits:
        return min(workers, key=lambda w: (-w.num_free_blocks, w.num_running + w.num_waiting, w.inflight,
                                           w.worker_id))
    return min(fits, key=lambda w: (-round(w.kv_free_fraction * KV_STEPS), w.num_running + w.num_waiting,
                                    w.inflight, w.worker_id))
