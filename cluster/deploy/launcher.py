"""`pdserve launch --config cluster.yaml`: the `ray job submit` entrypoint.

1. connect to the Ray cluster (`ray_address`, default "auto": the job's own cluster) in the
   namespace named after the cluster (`launch.namespace`, default `pdserve-<cluster>`);
2. list the named actors there and reconcile them with the config (cluster/deploy/reconcile.py):
   keep what matches, stop what is surplus or changed, create what is missing: workers as named,
   detached actors placed by `placement:` (CPUs/GPUs, custom resources, node labels, one
   placement group per expert-parallel worker), and `launch.routers` router actors;
3. start every desired actor (idempotent for the ones kept) and wait until each worker has loaded
   its model and registered in Redis;
4. block, re-reconciling every `launch.reconcile_interval_s` (a worker that died is replaced),
   until SIGTERM (`ray job stop`) or SIGINT; then stop every actor of the cluster, unless
   `launch.workers_outlive_job`. `--once` stops after step 3 and leaves the actors running.

The workers join the cluster-state Redis at `redis_url`. With `launch.start_redis`, when nothing
answers there, launch starts one at that address first (cluster/deploy/redis_actor.py); otherwise
running it is the deployment's job (the Helm chart's StatefulSet, or any Redis every node reaches).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from cluster.config import ClusterConfig
from cluster.deploy.layout import RedisSlot, RouterSlot, WorkerSlot, redis_slots, router_slots, worker_slots
from cluster.deploy.reconcile import Plan, parse_actor_name, plan

logger = logging.getLogger(__name__)


class LaunchStopped(Exception):
    """The stop event was set while the launcher waited."""


class Launcher:
    """Reconciles the named actors of one cluster with its config (see the module docstring)."""

    def __init__(self, config: ClusterConfig) -> None:
        if not config.redis_url:
            raise ValueError("pdserve launch needs redis_url: a Redis every node can reach (the workers register "
                             "there, and `pdserve router` processes find them there)")
        self.config = config
        self.namespace = config.launch.namespace_for(config.cluster)
        self.workers: list[dict] = []
        self.routers: list[dict] = []

    # ----- Ray -----
    def connect(self) -> None:
        import ray

        ray.init(address=self.config.ray_address or "auto", namespace=self.namespace,
                 logging_level=logging.WARNING, log_to_driver=False)

    def observed(self) -> list[str]:
        """Names of the live named actors in the cluster's namespace."""
        import ray

        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == self.namespace]

    def _slots(self, observed: list[str]) -> tuple[list[RedisSlot], list[WorkerSlot], list[RouterSlot]]:
        url = self.config.redis_url or ""
        redis: list[RedisSlot] = []
        if self.config.launch.start_redis:
            running = any((s := parse_actor_name(n)) is not None and s.name == "redis" for n in observed)
            redis = redis_slots(self.config, url, running=running, reachable=not running and _answers(url))
        return redis, worker_slots(self.config, url), router_slots(self.config, url)

    # ----- reconcile -----
    def reconcile(self, stop: threading.Event) -> Plan:
        """One pass: act on the plan, then start (or re-confirm) every desired actor."""
        import ray

        observed = self.observed()
        redis, workers, routers = self._slots(observed)
        p = plan(observed, [r.slot for r in redis] + [w.slot for w in workers] + [r.slot for r in routers])
        if p.foreign:
            logger.info("namespace %s: leaving actors that are not ours alone: %s", self.namespace, list(p.foreign))
        self._stop_actors(p.stop)
        creating = {s.name for s in p.create}
        for rs in redis:
            if rs.slot.name in creating:
                self._create_redis(rs)
        # Redis first: workers register there as they start.
        self._wait([ray.get_actor(rs.slot.actor_name, namespace=self.namespace).start.remote() for rs in redis],
                   stop, "Redis")
        for w in workers:
            if w.slot.name in creating:
                self._create_worker(w)
        for r in routers:
            if r.slot.name in creating:
                self._create_router(r)
        if p.changes:
            logger.info("cluster %s: %s", self.config.cluster, p.summary())
        handles = [ray.get_actor(w.slot.actor_name, namespace=self.namespace) for w in workers]
        self.workers = self._wait([h.start.remote() for h in handles], stop, "workers")
        # Routers after workers: their readiness needs registered workers.
        rhandles = [ray.get_actor(r.slot.actor_name, namespace=self.namespace) for r in routers]
        self.routers = self._wait([h.start.remote() for h in rhandles], stop, "routers")
        return p

    def _create_worker(self, w: WorkerSlot) -> None:
        from cluster.launch import create_worker_actor

        logger.info("starting worker %s (%s) with %s", w.slot.name, w.spec.role, w.options)
        create_worker_actor(w.spec, timeout_s=self.config.launch.start_timeout_s, options=w.options,
                            name=w.slot.actor_name, detached=True, ep_strategy=w.ep_strategy)

    def _create_redis(self, r: RedisSlot) -> None:
        from cluster.deploy.redis_actor import RedisActor

        logger.info("nothing answers at redis_url: starting a Redis there (launch.start_redis)")
        RedisActor.options(name=r.slot.actor_name, lifetime="detached", **r.options).remote(r.url)

    def _create_router(self, r: RouterSlot) -> None:
        from cluster.deploy.router_actor import RouterActor

        logger.info("starting router actor %s on port %d", r.slot.name, r.port)
        RouterActor.options(name=r.slot.actor_name, lifetime="detached", **r.options).remote(r.config, r.port)

    def _wait(self, refs: list[Any], stop: threading.Event, what: str) -> list[Any]:
        """ray.get(refs), polled so that a stop request (SIGTERM) is seen within ~0.5 s."""
        import ray

        deadline = time.monotonic() + self.config.launch.start_timeout_s
        pending = list(refs)
        while pending:
            if stop.is_set():
                raise LaunchStopped(f"stopped while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(refs)} {what} did not start within "
                                   f"{self.config.launch.start_timeout_s:.0f} s (resources the placement asks "
                                   "for may be missing: see `ray status`)")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        return ray.get(refs)

    # ----- down -----
    def _stop_actors(self, names: tuple[str, ...] | list[str]) -> None:
        """Graceful stop (deregister) within `launch.stop_timeout_s`, then kill; placement groups too."""
        import ray
        from ray.util.placement_group import remove_placement_group

        handles = []
        for name in names:
            try:
                handles.append((name, ray.get_actor(name, namespace=self.namespace)))
            except ValueError:
                continue  # gone meanwhile
        refs = [h.stop.remote() for _, h in handles]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.config.launch.stop_timeout_s)
        for name, h in handles:
            logger.info("stopping %s", name)
            ray.kill(h, no_restart=True)
            try:
                remove_placement_group(ray.util.get_placement_group(name))
            except ValueError:
                pass  # no placement group (EP = 1) under that name

    def stop_all(self) -> None:
        """Stop every actor this cluster's launches placed (names that parse as ours); a Redis
        the launch started goes last (the workers deregister there as they stop)."""
        ours = [(s.name, n) for n in self.observed() if (s := parse_actor_name(n)) is not None]
        self._stop_actors([n for slot, n in ours if slot != "redis"])
        self._stop_actors([n for slot, n in ours if slot == "redis"])


def _answers(url: str) -> bool:
    """Whether a Redis answers PING at `url` (1 s timeout)."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def run_launch(config: ClusterConfig, stop: threading.Event, once: bool = False) -> int:
    """The `pdserve launch` command: returns the exit status."""
    import ray

    launcher = Launcher(config)
    launcher.connect()
    interval = config.launch.reconcile_interval_s
    status = 0
    try:
        p = launcher.reconcile(stop)
        print(f"pdserve launch: cluster {config.cluster!r} (namespace {launcher.namespace}): {len(launcher.workers)} "
              f"workers ready ({p.summary()})", flush=True)
        for w in launcher.workers:
            print(f"pdserve launch: worker {w['worker_id']} ({w['role']}) at {w['address']}", flush=True)
        for r in launcher.routers:
            print(f"pdserve launch: router at {r['url']}/v1", flush=True)
        if once:
            return 0
        while not stop.wait(interval):
            try:
                launcher.reconcile(stop)
            except LaunchStopped:
                break
            except Exception as exc:  # noqa: BLE001 - keep serving; the next pass retries
                logger.warning("reconcile failed (retrying in %.0f s): %s", interval, exc)
    except LaunchStopped:
        pass
    except Exception as exc:  # noqa: BLE001 - a worker that failed to start (RayTaskError), a timeout, bad input
        logger.exception("launch failed")
        print(f"pdserve launch: error: {type(exc).__name__}: {exc}", flush=True)
        status = 1
    finally:
        if not once:
            if config.launch.workers_outlive_job:
                print("pdserve launch: stopping; the workers keep running (launch.workers_outlive_job)", flush=True)
            else:
                print("pdserve launch: stopping the cluster's actors", flush=True)
                launcher.stop_all()
        ray.shutdown()
    return status
