"""KV transfer counters: prove the transfer path is used (a decode that silently recomputes is a bug)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KVCounters:
    """Mutable by design: incremented in place by the receiver and the KV service of one worker.

    Both run on the worker's event loop thread, so plain `+=` needs no lock.
    """

    transfers_total: int = 0  # successful fetches (receiver side)
    transfer_bytes_total: int = 0
    transfer_seconds_total: float = 0.0
    failures_total: int = 0  # fetches that raised KVTransferError
    lease_expired_total: int = 0  # leases reaped on the serving side
    recompute_total: int = 0  # counted by the worker when its failure policy recomputes
    blocks_skipped_total: int = 0  # blocks the receiver already had in its prefix cache
    blocks_served_total: int = 0  # blocks streamed by PullBlocks (NIXL reads are one-sided, unseen here)
    resumed_total: int = 0  # requests resumed here from their generated tokens (KV recomputed)
    migrated_in_total: int = 0  # requests moved here mid-generation with their KV (pulled, not recomputed)
    migration_recompute_total: int = 0  # moved requests whose KV pull failed: recomputed here instead

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
