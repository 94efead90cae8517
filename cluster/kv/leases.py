"""Leases on pinned prefill KV: pure bookkeeping, no I/O, time passed in by the caller.

A prefill worker pins a finished prompt's blocks under a lease until the decode worker releases
them; the worker's reaper pops leases past their expiry and unpins their blocks, so KV is never
stranded when the receiver (or the router) dies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Lease:
    request_id: str
    block_ids: tuple[int, ...]  # in token order
    num_tokens: int
    expiry: float  # same clock as the `now` passed in (the worker uses unix time)


class LeaseTable:
    def __init__(self, lease_seconds: float = 30.0) -> None:
        if not (isinstance(lease_seconds, (int, float)) and math.isfinite(lease_seconds) and lease_seconds > 0):
            raise ValueError(f"lease_seconds must be a positive number, got {lease_seconds!r}")
        self.lease_seconds = float(lease_seconds)
        self.expired_total = 0
        self._leases: dict[str, Lease] = {}

    def add(self, request_id: str, block_ids: Sequence[int], num_tokens: int, now: float) -> float:
        """Lease `block_ids` to `request_id`; returns the expiry."""
        if not request_id:
            raise ValueError("a lease needs a non-empty request id")
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        blocks = tuple(int(b) for b in block_ids)
        if not blocks:
            raise ValueError(f"lease for {request_id!r} has no blocks")
        if any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"lease for {request_id!r} has negative or repeated block ids: {list(blocks)}")
        if num_tokens <= 0:
            raise ValueError(f"lease for {request_id!r} must cover at least one token, got {num_tokens}")
        _check_time(now)
        expiry = now + self.lease_seconds
        self._leases[request_id] = Lease(request_id, blocks, int(num_tokens), expiry)
        return expiry

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    def extend(self, request_id: str, now: float) -> float | None:
        """Push the expiry to now + lease_seconds; None when unknown or already past its expiry.

        A lease past its expiry is dead even before the reaper pops it: extending it would race
        the reaper that is about to unpin its blocks.
        """
        _check_time(now)
        lease = self._leases.get(request_id)
        if lease is None or now >= lease.expiry:
            return None
        expiry = max(lease.expiry, now + self.lease_seconds)
        self._leases[request_id] = Lease(lease.request_id, lease.block_ids, lease.num_tokens, expiry)
        return expiry

    def release(self, request_id: str) -> bool:
        """Drop the lease; False when unknown (never added, released, or reaped as expired)."""
        return self._leases.pop(request_id, None) is not None

    def pop_expired(self, now: float) -> list[str]:
        """Remove and return the ids of every lease whose expiry is at or before `now`."""
        _check_time(now)
        expired = [rid for rid, lease in self._leases.items() if lease.expiry <= now]
        for rid in expired:
            del self._leases[rid]
        self.expired_total += len(expired)
        return expired

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leases


def _check_time(now: float) -> None:
    if not (isinstance(now, (int, float)) and math.isfinite(now)):
        raise ValueError(f"time must be a finite number, got {now!r}")
