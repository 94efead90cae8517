"""Admission: the role machine plus the count of requests in flight by kind, on the event loop.

The gRPC servicer asks `enter(kind, epoch)` before it starts a request and `leave(kind)` when the
request's RPC ends; a role switch waits here until the kinds its target role drops are idle. The
check and the count happen with no await between them, so a request either got in before the
fence (and is waited for) or is refused by it.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

from cluster.worker.roles import Kind, Refusal, RoleMachine


class Admission:
    """One worker's admission state; the only writer of its RoleMachine besides the switch driver."""

    def __init__(self, roles: RoleMachine) -> None:
        self.roles = roles
        self._inflight: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    def inflight(self, kinds: Iterable[str] | None = None) -> int:
        return sum(self._inflight.values()) if kinds is None else sum(self._inflight[k] for k in kinds)

    def enter(self, kind: Kind, epoch: int) -> Refusal | None:
        refusal = self.roles.admit(kind, epoch)
        if refusal is None:
            self._inflight[kind] += 1
        return refusal

    def leave(self, kind: Kind) -> None:
        self._inflight[kind] -= 1
        asyncio.get_running_loop().create_task(self._notify())

    @contextlib.contextmanager
    def holding(self, kind: Kind) -> Iterator[None]:
        """Counts an admitted request until the block ends (for RPCs entered with `enter`)."""
        try:
            yield
        finally:
            self.leave(kind)

    async def wait_idle(self, kinds: Iterable[str], timeout_s: float) -> bool:
        """True once no request of `kinds` is in flight; False if `timeout_s` passed first."""
        kinds = tuple(kinds)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.inflight(kinds) == 0), timeout_s)
            except TimeoutError:
                return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
