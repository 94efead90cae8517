"""WorkerPool: the router's view of the workers (from the Redis registry) and its gRPC channels.

The registry is re-read at most every `refresh_s`; a worker that fails a call is marked down
locally at once so the next request goes elsewhere. In-flight counts are the router's own. The
channel of a worker that left the registry is closed once no call of ours is in flight on it
(closing it earlier would cancel those calls instead of letting them fail or finish).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from cluster.router.policy import WorkerView
from cluster.rpc import GRPC_OPTIONS
from cluster.state.store import Store, WorkerInfo
from cluster.worker.roles import SWITCHING_PHASES
from pdserve.v1 import kv_pb2_grpc, worker_pb2_grpc

logger = logging.getLogger(__name__)

@dataclass
class WorkerConn:
    info: WorkerInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    kv_stub: kv_pb2_grpc.KVStub
    inflight: int = 0
    down_until: float = 0.0

    def view(self) -> WorkerView:
        load = self.info.load
        return WorkerView(self.info.worker_id, self.info.role, self.info.address, self.info.epoch, load.num_running,
                          load.num_waiting, load.num_free_blocks, load.num_blocks, load.queued_prefill_tokens,
                          self.inflight)


@dataclass
class WorkerPool:
    store: Store
    refresh_s: float = 0.5
    down_s: float = 5.0
    conns: dict[str, WorkerConn] = field(default_factory=dict)
    _refreshed: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _background: asyncio.Task | None = None
    _retired: list[WorkerConn] = field(default_factory=list)  # gone from the registry, calls in flight

    async def refresh(self, force: bool = False) -> None:
        """Re-read the registry when stale. Once a view exists, the re-read runs in the background so
        a request never waits on Redis (a round trip costs milliseconds on a busy host)."""
        if not force and time.monotonic() - self._refreshed < self.refresh_s:
            return
        if not force and self.conns:
            if self._background is None or self._background.done():
                self._background = asyncio.get_running_loop().create_task(self._reload_quietly())
            return
        await self._reload(force)

    async def _reload_quietly(self) -> None:
        try:
            await self._reload(force=False)
        except Exception as exc:  # noqa: BLE001 - keep serving from the last view; /ready reports it
            logger.warning("registry refresh failed: %s", exc)

    async def _reload(self, force: bool) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._refreshed < self.refresh_s:
                return
            infos = {w.worker_id: w for w in await self.store.list_workers()}
            for wid in list(self.conns):
                if wid not in infos or infos[wid].address != self.conns[wid].info.address:
                    self._retired.append(self.conns.pop(wid))
            busy = []
            for conn in self._retired:
                if conn.inflight:
                    busy.append(conn)
                else:
                    await conn.channel.close()
            self._retired = busy
            for wid, info in infos.items():
                conn = self.conns.get(wid)
                if conn is None:
                    channel = grpc.aio.insecure_channel(info.address, options=GRPC_OPTIONS)
                    self.conns[wid] = WorkerConn(info, channel, worker_pb2_grpc.WorkerStub(channel),
                                                 kv_pb2_grpc.KVStub(channel))
                else:
                    conn.info = info
            self._refreshed = time.monotonic()

    def ready(self, *roles: str) -> list[WorkerConn]:
        now = time.monotonic()
        return [c for c in self.conns.values() if c.info.role in roles and c.info.ready and c.down_until <= now]

    def switching(self) -> bool:
        """Whether some registered worker is in the middle of a role switch (its role may return)."""
        return any(c.info.phase in SWITCHING_PHASES for c in self.conns.values())

    def mark_down(self, worker_id: str) -> None:
        conn = self.conns.get(worker_id)
        if conn is not None:
            conn.down_until = time.monotonic() + self.down_s
            logger.warning("worker %s (%s) marked down for %.0fs", worker_id, conn.info.address, self.down_s)

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
        for conn in [*self.conns.values(), *self._retired]:
            await conn.channel.close()
        self.conns.clear()
        self._retired.clear()
