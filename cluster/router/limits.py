"""Per-API-key request rate limits: the RateLimiter protocol, an in-memory one, a Redis adapter.

Fixed 60 s windows (as `Store.rate_limit` does), so the in-memory and Redis limiters agree: a key
gets `limit` requests per wall-clock minute window, and a refused caller is told how long until
the next window starts.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

WINDOW_S = 60.0


class RateLimiter(Protocol):
    async def allow(self, api_key: str) -> tuple[bool, float]:
        """Count one request: (allowed, seconds to wait before retrying; 0.0 when allowed)."""
        ...


class FixedWindowRateLimiter:
    """One router process: counts per key in the current window; older windows are dropped."""

    def __init__(self, limit_per_minute: int, clock: Callable[[], float] = time.time) -> None:
        if limit_per_minute <= 0:
            raise ValueError(f"limit_per_minute must be positive, got {limit_per_minute}")
        self.limit = limit_per_minute
        self._clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    async def allow(self, api_key: str) -> tuple[bool, float]:
        # No await inside: the check-and-count is atomic on the event loop without a lock.
        now = self._clock()
        window = math.floor(now / WINDOW_S)
        if window != self._window:
            # A new window: every key starts over, and memory stays bounded by one window's keys.
            self._window, self._counts = window, {}
        count = self._counts.get(api_key, 0) + 1
        self._counts[api_key] = count
        if count <= self.limit:
            return True, 0.0
        return False, max((window + 1) * WINDOW_S - now, 0.001)


class RedisRateLimiter:
    """Shared across routers: delegates to `Store.rate_limit(api_key, limit_per_minute)`."""

    def __init__(self, store, limit_per_minute: int) -> None:  # store: cluster.state.store.Store
        if limit_per_minute <= 0:
            raise ValueError(f"limit_per_minute must be positive, got {limit_per_minute}")
        self.store = store
        self.limit = limit_per_minute

    async def allow(self, api_key: str) -> tuple[bool, float]:
        allowed, retry_after = await self.store.rate_limit(api_key, self.limit)
        return bool(allowed), float(retry_after)
