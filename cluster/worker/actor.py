"""WorkerActor: a Ray actor hosting one WorkerRuntime.

Ray places and restarts the process; the data plane does not go through Ray (router -> worker is
gRPC, worker -> worker KV is NIXL or gRPC). The actor's spec is a plain dict validated as a
`WorkerSpec`, so nothing but JSON-able data crosses Ray for it.
"""
from __future__ import annotations

import logging
import os

import ray


@ray.remote
class WorkerActor:
    def __init__(self, spec: dict) -> None:
        from cluster.config import WorkerSpec

        self.spec = WorkerSpec.model_validate(spec)
        # One engine per worker process: limit torch's threads so co-located workers do not fight
        # over cores (two 2-thread workers on 2 cores run ~10x slower than 1 thread each), and
        # pin them to this worker's own cores when the session planned some.
        os.environ["OMP_NUM_THREADS"] = str(self.spec.num_threads)
        from cluster.cpu_binding import pin_process, reset_niceness

        if self.spec.cpu_cores:
            pin_process(self.spec.cpu_cores)
        # Ray starts workers at nice 15 (its `worker_niceness`): an engine at nice 15 loses its
        # cores to every other process on the host.
        reset_niceness()
        import torch

        torch.set_num_threads(self.spec.num_threads)
        logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.runtime = None

    async def start(self) -> dict:
        """Load the model, serve gRPC, register; returns {worker_id, address, role, pid, expert_parallel_size}.
        Idempotent: a launcher that adopts a running actor calls it again and gets the same answer."""
        import asyncio

        from cluster.worker.runtime import WorkerRuntime

        if not hasattr(self, "_start_lock"):
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not getattr(self, "_started", False):
                await self._start(WorkerRuntime)
                self._started = True
        return {"worker_id": self.runtime.worker_id, "address": self.runtime.address, "role": self.runtime.role,
                "pid": os.getpid(), "expert_parallel_size": self.runtime.ep_size}

    async def _start(self, runtime_cls) -> None:
        launcher = None
        if self.spec.engine.expert_parallel_size > 1:
            from cluster.worker.ep_ranks import ray_launcher

            launcher = ray_launcher()  # ranks 1..N-1 as Ray actors in this actor's placement group
        self.runtime = runtime_cls(self.spec, ep_launcher=launcher)
        await self.runtime.start()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
            self.runtime = None
        self._started = False

    async def leaks(self) -> list[str]:
        """Engine leak check plus leases still held (for tests and drains)."""
        rt = self.runtime
        problems = await rt.loop.call(lambda e: e.leaks())
        if len(rt.leases):
            problems.append(f"leases still held: {len(rt.leases)}")
        return problems

    async def stats(self) -> bytes:
        """StatsResponse, serialized (protobuf, not pickle)."""
        return (await self.runtime.stats()).SerializeToString()

    async def peer_errors(self) -> dict[str, str]:
        """Handshake failures by peer address (layout or protocol mismatches)."""
        return dict(self.runtime.peer_errors)

    def pid(self) -> int:
        return os.getpid()

    def ep_pids(self) -> list[int]:
        """Pids of ranks 1..N-1 of the worker's expert-parallel group ([] for EP=1)."""
        return list(self.runtime.ep_pids) if self.runtime is not None else []
