"""WorkerRuntime: one worker's parts wired together (engine loop, gRPC server, KV, registry).

Start order: engine -> KV region (NIXL registration) -> gRPC server (Worker + KV services) ->
register in Redis. Then a housekeeping task every heartbeat: reap expired leases, heartbeat the
load, and (decode/mixed roles) handshake with prefill peers that appeared in the registry, so
connection set-up never lands on a request's path. Stop reverses it and leaves nothing behind.

An expert-parallel worker (`engine.expert_parallel_size` N > 1) is rank 0 of its group, with the
other ranks as child processes. If its engine fails (a rank died: the step in progress raises,
or housekeeping sees the rank's process gone while idle), the worker fails every request at once
with UNAVAILABLE, deregisters so routers stop picking it, and refuses new requests; Health says
why. It does not restart itself: whoever runs the actor replaces it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import grpc

from cluster.config import WorkerSpec
from cluster.kv.counters import KVCounters
from cluster.kv.layout import KVLayout
from cluster.kv.leases import LeaseTable
from cluster.kv.receiver import KVLayoutMismatch, KVReceiver
from cluster.kv.service import KVServicer
from cluster.rpc import GRPC_OPTIONS
from cluster.state.prefix import prefix_block_hashes
from cluster.state.store import Store, WorkerInfo, WorkerLoad
from cluster.worker.admission import Admission
from cluster.worker.address import advertised_host, node_ip
from cluster.worker.engine_loop import EngineDead, EngineLoop, HeldKV
from cluster.worker.service import ROLE_PB, WorkerServicer
from cluster.worker.roles import RoleMachine
from cluster.worker.stats import stats_response
from cluster.worker.switch import RoleSwitcher
from engine.llm_engine import LLMEngine
from pdserve.v1 import kv_pb2, kv_pb2_grpc, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (a killed child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the parenthesised command name, which may itself contain spaces.
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: only existence can be checked
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class WorkerRuntime:
    def __init__(self, spec: WorkerSpec, ep_launcher: Any = None) -> None:
        """`ep_launcher` starts an expert-parallel worker's other ranks (default: child processes)."""
        self.spec = spec
        self.ep_launcher = ep_launcher
        self.worker_id = spec.worker_id or f"{spec.role}-{uuid.uuid4().hex[:8]}"
        # The single owner of role, epoch and phase; the servicer asks it, the switcher drives it.
        self.roles = RoleMachine(self.worker_id, spec.role, time.time())
        self.admission = Admission(self.roles)
        self.switcher = RoleSwitcher(self.admission, publish=self._publish_phase, write_role=self._write_role,
                                     restore=self._restore_registration,
                                     hand_off=lambda rid, why: self.loop.hand_off(
                                         rid, why, with_kv=(lambda held: self._lease_moved(rid, held))
                                         if spec.migrate_kv else None),
                                     default_drain_s=spec.drain_timeout_seconds)
        self.ep_size = spec.engine.expert_parallel_size
        self.ep_pids: list[int] = []
        self.started_ts = time.time()
        self.address = ""
        self.kv_counters = KVCounters()
        self.leases = LeaseTable(spec.kv_lease_seconds)
        self.peer_errors: dict[str, str] = {}  # address -> handshake error
        self._tasks: set[asyncio.Task] = set()
        self._server: grpc.aio.Server | None = None
        self._housekeeping: asyncio.Task | None = None
        self.loop: EngineLoop
        self.store: Store

    @property
    def role(self) -> str:
        return self.roles.role

    @property
    def epoch(self) -> int:
        return self.roles.epoch

    @property
    def failure(self) -> str | None:
        """Why the engine failed (the worker then serves nothing), else None."""
        return self.roles.reason if self.roles.phase == "failed" else None

    # ----- lifecycle -----
    async def start(self) -> None:
        spec = self.spec
        kwargs = spec.engine.engine_kwargs()
        if self.ep_launcher is not None:
            kwargs["ep_launcher"] = self.ep_launcher
        engine = await asyncio.to_thread(LLMEngine.from_args, spec.engine.model, **kwargs)
        if self.ep_size > 1:
            self.ep_pids = list(engine.runner.group.pids)
            logger.info("worker %s: expert-parallel group of %d, rank pids %s", self.worker_id, self.ep_size,
                        self.ep_pids)
        self.block_size = engine.config.cache.block_size
        self.max_model_len = engine.config.scheduler.max_model_len
        self.model_name = engine.config.model.path
        self.layout = KVLayout.from_engine_config(engine.config)
        aio = asyncio.get_running_loop()

        def on_dead(exc: BaseException) -> None:  # on the engine thread
            try:
                aio.call_soon_threadsafe(self._engine_failed, exc)
            except RuntimeError:  # the event loop is closed: the worker is going away anyway
                pass

        self.loop = EngineLoop(engine, name=f"engine-{self.worker_id}", on_dead=on_dead)
        kv_caches = engine.runner.kv_caches
        self.receiver = KVReceiver(self.worker_id, self.layout, kv_caches, spec.kv_transport, self.kv_counters,
                                   timeout_s=spec.kv_timeout_seconds)
        self.kv_service = KVServicer(self.worker_id, self.layout, kv_caches, self.leases, self._release_blocks,
                                     self.kv_counters, self.receiver.nixl_source)
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self), self._server)
        kv_pb2_grpc.add_KVServicer_to_server(self.kv_service, self._server)
        port = self._server.add_insecure_port(f"{spec.host}:{spec.port}")
        await self._server.start()
        self.address = f"{advertised_host(spec.host, spec.advertise_host, node_ip)}:{port}"
        self.store = Store.from_url(spec.redis_url, spec.cluster)
        await self.store.register_worker(self._info(await self._load()), ttl_s=spec.registry_ttl_seconds)
        self._housekeeping = asyncio.create_task(self._housekeep())
        logger.info("worker %s (%s) serving on %s, KV over %s, layout %s", self.worker_id, self.role, self.address,
                    spec.kv_transport, self.layout.hash())

    async def stop(self) -> None:
        """Deregister first (routers stop sending), then close the server and the engine."""
        self.roles.stop(time.time())
        self.switcher.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        try:
            await self.store.deregister(self.worker_id)
            await self.store.close()
        except Exception as exc:  # noqa: BLE001 - Redis may already be gone at shutdown
            logger.warning("deregistering %s failed: %s", self.worker_id, exc)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await self.receiver.close()
        # The engine thread closes the engine (and with it the ranks of an EP group) on its way out.
        if not await asyncio.to_thread(self.loop.stop):
            logger.warning("worker %s: engine thread did not stop; closing the engine from here", self.worker_id)
            await asyncio.to_thread(self.loop.engine.close)

    def _engine_failed(self, exc: BaseException) -> None:
        """The engine loop died (its requests already failed): stop being routable, at once."""
        if self.failure is not None:
            return
        self.switcher.cancel()
        self.roles.fail(f"engine failed: {exc}", time.time())
        logger.error("worker %s: %s; deregistering (requests now get UNAVAILABLE)", self.worker_id, self.failure)
        if self._housekeeping is not None:
            self._housekeeping.cancel()  # it would heartbeat (and so re-register) the worker
        self._spawn(self._deregister_failed())

    async def _deregister_failed(self) -> None:
        try:
            await self.store.deregister(self.worker_id)
        except Exception as exc:  # noqa: BLE001 - without a heartbeat the registration expires anyway
            logger.warning("deregistering failed worker %s: %s", self.worker_id, exc)

    def _check_ranks(self) -> None:
        """An idle EP worker notices a dead rank here rather than on the next request's step."""
        dead = [(rank, pid) for rank, pid in enumerate(self.ep_pids, start=1) if not pid_alive(pid)]
        if dead and self.loop.alive:
            what = "; ".join(f"expert-parallel rank {rank} (pid {pid}) is gone" for rank, pid in dead)
            self.loop.fail(EngineDead(f"expert-parallel group failed: {what}"))

    # ----- used by the services -----
    async def _release_blocks(self, request_id: str) -> None:
        def release(engine: LLMEngine) -> None:
            try:
                engine.release_kv(request_id)
            except ValueError:  # aborted meanwhile: its blocks are already free
                pass

        try:
            await self.loop.call(release)
        except EngineDead:  # a failed engine serves nothing more: nothing to unpin
            pass

    def _lease_moved(self, request_id: str, held: HeldKV) -> kv_pb2.KVHandle:
        """A request handed off with its KV: pin the blocks under a lease (released when the target
        has pulled them, or at expiry) and say where they are."""
        expiry = self.leases.add(request_id, list(held.block_ids), held.num_tokens, time.time())
        return self.kv_handle(request_id, held.block_ids, held.num_tokens, expiry, held.mm_spans, held.mrope_delta)

    def kv_handle(self, request_id: str, block_ids, num_tokens: int, expiry: float,
                  mm_spans=(), mrope_delta: int | None = None) -> kv_pb2.KVHandle:
        """Where a request's pinned KV is, for the worker that pulls it; a vision prompt's handle
        also names its images (the receiver's prefix cache keys on them) and its rotary delta."""
        handle = kv_pb2.KVHandle(worker_id=self.worker_id, kv_address=self.address, request_id=request_id,
                                 block_ids=block_ids, num_tokens=num_tokens, layout_hash=self.layout.hash(),
                                 lease_expiry_unix=expiry, transport=self.spec.kv_transport,
                                 mm_spans=[kv_pb2.MMSpan(offset=o, length=n, content_hash=h) for o, n, h in mm_spans])
        if mrope_delta is not None:
            handle.mrope_delta = mrope_delta
        return handle

    async def abort(self, request_id: str) -> bool:
        leased = self.leases.release(request_id)
        try:
            found = await self.loop.abort(request_id)
        except EngineDead:  # the engine already dropped every request
            found = False
        return found or leased

    def publish_prefix(self, prompt_token_ids: list[int], mm_spans=()) -> None:
        hashes = prefix_block_hashes(prompt_token_ids, self.block_size, mm_spans)
        if hashes:
            self._spawn(self.store.publish_prefix(self.worker_id, hashes))

    async def stats(self, expert_load: bool = True) -> worker_pb2.StatsResponse:
        """The worker's counters; `expert_load` adds the per-expert token counts (MoE models)."""
        def read(engine: LLMEngine):
            queued = sum(r.num_prompt_tokens - r.num_computed_tokens for r in engine.scheduler.waiting
                         if r.num_computed_tokens < r.num_prompt_tokens)
            counts = [c.tolist() for c in engine.runner.expert_counts(total=True)] if expert_load else []
            return engine.stats(), queued, counts

        s, queued, counts = await self.loop.call(read)
        return stats_response(self.worker_id, ROLE_PB[self.role], self.epoch, s, self.kv_counters,
                              num_active_leases=len(self.leases), queued_prefill_tokens=queued,
                              expert_parallel_size=self.ep_size, expert_load=counts,
                              role_switches_total=self.roles.switches_total,
                              role_switch_counts={(ROLE_PB[a], ROLE_PB[b]): n
                                                  for (a, b), n in self.roles.switch_counts.items()},
                              phase_durations=self.roles.durations,
                              sequences_migrated_total=self.switcher.migrated_total)

    # ----- housekeeping -----
    async def _load(self) -> WorkerLoad:
        s = await self.stats(expert_load=False)
        return WorkerLoad(num_running=s.num_requests_running, num_waiting=s.num_requests_waiting,
                          num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks,
                          queued_prefill_tokens=s.queued_prefill_tokens, prefix_cache_hits=s.prefix_cache_hits,
                          num_holding_kv=s.num_holding_kv)

    def _info(self, load: WorkerLoad) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, address=self.address, role=self.role, epoch=self.epoch,
                          model=self.model_name, layout_hash=self.layout.hash(), transport=self.spec.kv_transport,
                          load=load, heartbeat_ts=time.time(), ready=self.roles.ready, started_ts=self.started_ts,
                          expert_parallel_size=self.ep_size, phase=self.roles.phase, block_size=self.block_size,
                          max_model_len=self.max_model_len)

    # ----- role switching (driven by self.switcher) -----
    async def _publish_phase(self) -> None:
        """Heartbeat now, so routers see a fence or a flip without waiting for the next tick."""
        load = await self._load()
        if not await self.store.heartbeat(self.worker_id, load, ready=self.roles.ready,
                                          ttl_s=self.spec.registry_ttl_seconds, phase=self.roles.phase):
            await self.store.register_worker(self._info(load), ttl_s=self.spec.registry_ttl_seconds)

    async def _write_role(self, role: str, epoch: int) -> bool:
        return await self.store.set_role(self.worker_id, role, epoch)  # type: ignore[arg-type]

    async def _restore_registration(self) -> None:
        """After a rollback: the whole hash again, old role and epoch included (set_role cannot
        lower an epoch that a half-done flip may have written)."""
        await self.store.register_worker(self._info(await self._load()), ttl_s=self.spec.registry_ttl_seconds)

    async def _housekeep(self) -> None:
        while True:
            try:
                self._check_ranks()
                await self.kv_service.reap(time.time())
                load = await self._load()
                if not await self.store.heartbeat(self.worker_id, load, ready=self.roles.ready,
                                                  ttl_s=self.spec.registry_ttl_seconds, phase=self.roles.phase):
                    await self.store.register_worker(self._info(load), ttl_s=self.spec.registry_ttl_seconds)
                if self.role == "decode" or (self.role == "mixed" and self.ep_size == 1):
                    await self._connect_peers()  # an EP group takes no KV (see WorkerServicer.Decode)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep heartbeating through transient Redis errors
                logger.warning("worker %s housekeeping: %s", self.worker_id, exc)
            await asyncio.sleep(self.spec.heartbeat_seconds)

    async def _connect_peers(self) -> None:
        for w in await self.store.list_workers():
            if w.role not in ("prefill", "mixed") or w.worker_id == self.worker_id or w.address in self.peer_errors:
                continue
            try:
                await self.receiver.handshake(w.address)
            except KVLayoutMismatch as exc:
                self.peer_errors[w.address] = str(exc)
                logger.error("worker %s cannot take KV from %s: %s", self.worker_id, w.worker_id, exc)
            except Exception as exc:  # noqa: BLE001 - the peer may be starting or gone; retried next tick
                logger.info("handshake with %s not done yet: %s", w.address, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
