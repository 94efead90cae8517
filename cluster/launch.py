"""Bring a whole pdserve cluster up and down: Redis, Ray, workers (Ray actors), the router.

`pdserve serve` uses `ServeSession` on one machine: an embedded Redis unless a URL is given, a
local Ray started with the CPUs the workers need (or an existing Ray via `ray_address`), one
actor per worker, and the router in this process. `stop()` undoes every step it did, by handle
and pid, so Ctrl-C leaves no process behind.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ClusterConfig, WorkerSpec

logger = logging.getLogger(__name__)


@dataclass
class ServeSession:
    config: ClusterConfig
    redis_url: str = ""
    workers: list[dict] = field(default_factory=list)  # {worker_id, address, role, pid, expert_parallel_size}
    actors: list[Any] = field(default_factory=list)
    placement_groups: list[Any] = field(default_factory=list)  # one per expert-parallel worker
    _embedded: Any = None
    _started_ray: bool = False
    _ray_tmp: str | None = None
    _server: Any = None
    _server_thread: threading.Thread | None = None

    # ----- up -----
    def start_state(self) -> str:
        if self.config.redis_url:
            self.redis_url = self.config.redis_url
        else:
            from cluster.state.embedded import EmbeddedRedis

            self._embedded = EmbeddedRedis()
            self.redis_url = self._embedded.start()
            logger.info("embedded Redis at %s", self.redis_url)
        return self.redis_url

    def start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        c = self.config
        if c.ray_address:
            ray.init(address=c.ray_address, logging_level=logging.WARNING)
        else:
            # Every rank of an expert-parallel worker runs one torch thread of its own.
            cpus = sum(spec.num_cpus for spec in c.worker_specs(self.redis_url))
            # A short path: Ray's unix sockets live under it and have a ~100 character limit.
            self._ray_tmp = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")
            # Ray starts worker processes at nice 15 by default: then the router, the clients and
            # anything else on the host preempt the engine, and its OpenMP threads stall on each
            # other at every barrier. Serving workers are the critical path: nice 0.
            ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=self._ray_tmp,
                     logging_level=logging.WARNING, log_to_driver=False,
                     _system_config={"worker_niceness": 0})
        self._started_ray = True

    def start_workers(self, timeout_s: float = 600.0) -> list[dict]:
        import ray

        from cluster.worker.actor import WorkerActor

        specs = self.config.worker_specs(self.redis_url)
        for spec, cores in zip(specs, self._cpu_sets(specs)):
            if cores is not None:
                spec = spec.model_copy(update={"cpu_cores": cores})
            self.actors.append(self.create_worker(spec))
        self.workers = ray.get([a.start.remote() for a in self.actors], timeout=timeout_s)
        for w in self.workers:
            logger.info("worker %s (%s, EP %d) at %s, pid %s", w["worker_id"], w["role"], w["expert_parallel_size"],
                        w["address"], w["pid"])
        return self.workers

    def _cpu_sets(self, specs: list[WorkerSpec]) -> list[tuple[int, ...] | None]:
        """Cores per worker. 'auto' pins only when this session started Ray, i.e. owns the
        host's workers; explicit core sets apply whenever Ray is local to this machine."""
        from cluster.cpu_binding import available_cores, plan_cpu_sets

        mode = self.config.cpu_bind
        if self.config.ray_address or (mode == "auto" and not self._started_ray):
            return [None] * len(specs)
        # An expert-parallel worker pins rank 0's threads; its other ranks are separate actors.
        sets = plan_cpu_sets(mode, [s.num_cpus for s in specs], available_cores())
        return [None if c is None else c[: s.num_threads] for c, s in zip(sets, specs)]

    def create_worker(self, spec: WorkerSpec, timeout_s: float = 120.0) -> Any:
        """A WorkerActor for `spec` (not started), see `create_worker_actor`; its placement group
        (expert-parallel workers) is removed by `stop()`."""
        actor, pg = create_worker_actor(spec, timeout_s=timeout_s)
        if pg is not None:
            self.placement_groups.append(pg)
        return actor

    def start_router(self, port: int | None = None) -> str:
        """Serve the router from a background thread; returns its base URL once it accepts connections."""
        import uvicorn

        app = build_router_app(self.config, self.redis_url)
        port = self.config.port if port is None else port
        cfg = uvicorn.Config(app, host=self.config.host, port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(cfg)
        self._server_thread = threading.Thread(target=self._server.run, name="router", daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the router did not start on {self.config.host}:{port}")
            time.sleep(0.05)
        bound = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.config.host}:{bound}"

    def start(self) -> str:
        self.start_state()
        self.start_ray()
        self.start_workers()
        return self.start_router()

    # ----- down -----
    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(15)
            self._server = None
        if self.actors:
            import ray

            try:
                ray.get([a.stop.remote() for a in self.actors], timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dead actor cannot deregister; kill it anyway
                logger.warning("stopping workers: %s", exc)
            for a in self.actors:
                ray.kill(a)
            self.actors.clear()
        if self.placement_groups:
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups:
                remove_placement_group(pg)
            self.placement_groups.clear()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


def create_worker_actor(spec: WorkerSpec, timeout_s: float = 120.0, *, options: dict[str, Any] | None = None,
                        name: str | None = None, detached: bool = False,
                        ep_strategy: str = "STRICT_PACK") -> tuple[Any, Any]:
    """A WorkerActor for `spec` (not started) and its placement group (None for EP=1).

    `options`: Ray actor options of rank 0 (default: `spec.num_threads` CPUs); `name` and
    `detached` make it a named actor that outlives its creator (`pdserve launch`). An
    expert-parallel worker gets a placement group with one bundle per rank (strategy
    `ep_strategy`, STRICT_PACK by default): the actor (rank 0) in bundle 0, its other ranks (Ray
    actors it creates) in the others, so the group is placed and reserved as a whole; the group
    takes the actor's name and lifetime."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.worker.actor import WorkerActor

    opts: dict[str, Any] = dict(options) if options else {"num_cpus": spec.num_threads}
    lifetime = "detached" if detached else None
    if name is not None:
        opts.update(name=name, lifetime=lifetime)
    n = spec.engine.expert_parallel_size
    if n == 1:
        return WorkerActor.options(**opts).remote(spec.model_dump()), None
    rank0 = {"CPU": opts.get("num_cpus", spec.num_threads), **opts.get("resources", {})}
    if opts.get("num_gpus"):
        rank0["GPU"] = opts["num_gpus"]
    if opts.get("memory"):
        rank0["memory"] = opts["memory"]
    others = {"CPU": 1, **({"GPU": opts["num_gpus"]} if opts.get("num_gpus") else {})}
    bundles = [rank0] + [dict(others) for _ in range(n - 1)]
    labels = opts.pop("label_selector", None)
    pg_kwargs: dict[str, Any] = {"strategy": ep_strategy, "name": name or "", "lifetime": lifetime}
    if labels:
        pg_kwargs["bundle_label_selector"] = [dict(labels) for _ in bundles]
    pg = placement_group(bundles, **pg_kwargs)
    ray.get(pg.ready(), timeout=timeout_s)
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    opts.pop("resources", None)  # reserved by the bundle
    return WorkerActor.options(scheduling_strategy=strategy, **opts).remote(spec.model_dump()), pg


def build_router_app(config: ClusterConfig, redis_url: str):
    """The router app of `pdserve serve` (the model read with the engine's loader, which converts a
    GGUF on the way); a router process of its own uses cluster/router/standalone.py."""
    from cluster.router.cluster_backend import model_info
    from cluster.router.model import default_served_name
    from cluster.router.standalone import build_app

    info = model_info(config.engine, config.served_model_name or default_served_name(config.engine.model))
    return build_app(config, redis_url, info)
