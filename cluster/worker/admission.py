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
        self._ids: dict[str, set[str]] = {}  # kind -> ids of the admitted requests still running
        self._changed = asyncio.Condition()
        self._notifies: set[asyncio.Task] = set()  # referenced until done (the loop keeps weak refs)

    def inflight(self, kinds: Iterable[str] | None = None) -> int:
        return sum(self._inflight.values()) if kinds is None else sum(self._inflight[k] for k in kinds)

    def enter(self, kind: Kind, epoch: int) -> Refusal | None:
        refusal = self.roles.admit(kind, epoch)
        if refusal is None:
            self._inflight[kind] += 1
        return refusal

    def leave(self, kind: Kind, request_id: str = "") -> None:
        self._inflight[kind] -= 1
        self._ids.get(kind, set()).discard(request_id)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifies.add(task)
        task.add_done_callback(self._notifies.discard)

    def running(self, kinds: Iterable[str]) -> list[str]:
        """Ids of the admitted requests of `kinds` still in flight."""
        return sorted(set().union(*(self._ids.get(k, set()) for k in kinds)))

    @contextlib.contextmanager
    def holding(self, kind: Kind, request_id: str = "") -> Iterator[None]:
        """Counts an admitted request until the block ends (for RPCs entered with `enter`)."""
        if request_id:
            self._ids.setdefault(kind, set()).add(request_id)
        try:
            yield
        finally:
            self.leave(kind, request_id)

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
