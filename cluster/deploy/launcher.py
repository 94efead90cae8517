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
   `launch.workers_outlive_job`. `--once` stops after step 3 and leaves the actors running;
   `--down` stops them all.

Several launches of one cluster: the last one to change the config leads (cluster/deploy/lead.py,
a record in Redis); a lasting launch that finds itself replaced stops reconciling and exits
without stopping anything, so a changed config submitted as a new job takes over from the old job.

The workers join the cluster-state Redis at `redis_url`. With `launch.start_redis`, when nothing
answers there, launch starts one at that address first (cluster/deploy/redis_actor.py); otherwise
running it is the deployment's job (the Helm chart's StatefulSet, or any Redis every node reaches).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from cluster.config import ClusterConfig
from cluster.deploy.layout import RedisSlot, RouterSlot, WorkerSlot, redis_slots, router_slots, worker_slots
from cluster.deploy.lead import LaunchRecord, superseded, takes_lead
from cluster.deploy.reconcile import Plan, digest, parse_actor_name, plan
from cluster.state.keys import Keys

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
        self.me = uuid.uuid4().hex[:12]  # this launch's id in the lead record (cluster/deploy/lead.py)
        self.leading = False
        self._key = Keys(config.cluster).launcher()
        self._lead_ttl_s = 3 * config.launch.reconcile_interval_s + 5

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

    # ----- lead (cluster/deploy/lead.py) -----
    def _record(self) -> LaunchRecord | None:
        with _client(self.config.redis_url or "") as r:
            return LaunchRecord.from_hash(r.hgetall(self._key))

    def _write_record(self, want: str) -> None:
        with _client(self.config.redis_url or "") as r:
            r.hset(self._key, mapping=LaunchRecord(self.me, want, time.time()).to_hash())

    def take_lead(self, want: str = "") -> None:
        """Lead unconditionally (`--down`): a running leader steps down at its next pass."""
        self._write_record(want)
        self.leading = True

    def release_lead(self) -> None:
        """Remove the record if it is still ours (the next launch takes over at once)."""
        with _client(self.config.redis_url or "") as r:
            record = LaunchRecord.from_hash(r.hgetall(self._key))
            if record is not None and record.owner == self.me:
                r.delete(self._key)
        self.leading = False

    def _lead(self, want: str, first: bool, once: bool) -> bool:
        """False when another launch has taken the lead (this one is superseded)."""
        record = self._record()
        if first:
            self.leading = takes_lead(record, self.me, want, once, time.time(), self._lead_ttl_s)
            if self.leading:
                if record is not None and record.owner != self.me:
                    logger.info("taking the lead from launch %s", record.owner)
                self._write_record(want)
            return True
        if not self.leading:
            return True
        if superseded(record, self.me):
            return False
        self._write_record(want)  # the heartbeat
        return True

    # ----- reconcile -----
    def reconcile(self, stop: threading.Event, first: bool = False, once: bool = False) -> Plan | None:
        """One pass: act on the plan, then start (or re-confirm) every desired actor. None when
        another launch has taken the lead (nothing was done)."""
        import ray

        observed = self.observed()
        redis, workers, routers = self._slots(observed)
        slots = [r.slot for r in redis] + [w.slot for w in workers] + [r.slot for r in routers]
        p = plan(observed, slots)
        creating = {s.name for s in p.create}
        # The Redis first: the lead record and the workers' registry live there.
        for rs in redis:
            if rs.slot.name in creating:
                self._create_redis(rs)
        self._wait([ray.get_actor(rs.slot.actor_name, namespace=self.namespace).start.remote() for rs in redis],
                   stop, "Redis")
        if not self._lead(digest(sorted(s.actor_name for s in slots)), first, once):
            return None
        if p.foreign:
            logger.info("namespace %s: leaving actors that are not ours alone: %s", self.namespace, list(p.foreign))
        self._stop_actors(p.stop)
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
        try:
            create_worker_actor(w.spec, timeout_s=self.config.launch.start_timeout_s, options=w.options,
                                name=w.slot.actor_name, detached=True, ep_strategy=w.ep_strategy)
        except ValueError as exc:  # the name is taken: a concurrent launch of the same config made it
            logger.info("worker %s exists already: %s", w.slot.name, exc)

    def _create_redis(self, r: RedisSlot) -> None:
        from cluster.deploy.redis_actor import RedisActor

        logger.info("nothing answers at redis_url: starting a Redis there (launch.start_redis)")
        try:
            RedisActor.options(name=r.slot.actor_name, lifetime="detached", **r.options).remote(r.url)
        except ValueError as exc:  # a concurrent launch made it
            logger.info("the Redis actor exists already: %s", exc)

    def _create_router(self, r: RouterSlot) -> None:
        from cluster.deploy.router_actor import RouterActor

        logger.info("starting router actor %s on port %d", r.slot.name, r.port)
        try:
            RouterActor.options(name=r.slot.actor_name, lifetime="detached", **r.options).remote(r.config, r.port)
        except ValueError as exc:  # a concurrent launch made it
            logger.info("router actor %s exists already: %s", r.slot.name, exc)

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


def _client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0, decode_responses=True)


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
    replaced = False
    try:
        p = launcher.reconcile(stop, first=True, once=once)
        assert p is not None  # the first pass always acts
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
                if launcher.reconcile(stop) is None:
                    replaced = True
                    print("pdserve launch: another launch has taken the lead; leaving the actors to it", flush=True)
                    break
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
        if not once and not replaced:
            _leave(launcher)
        ray.shutdown()
    return status


def _leave(launcher: Launcher) -> None:
    """A lasting launch ends: stop the cluster's actors if it still leads them."""
    try:
        leads = launcher.leading and not superseded(launcher._record(), launcher.me)
    except Exception as exc:  # noqa: BLE001 - Redis gone: the actors are still ours to stop
        logger.warning("cannot read the lead record (%s); stopping the actors anyway", exc)
        leads = launcher.leading
    if not leads:
        print("pdserve launch: stopping; another launch leads the actors", flush=True)
    elif launcher.config.launch.workers_outlive_job:
        print("pdserve launch: stopping; the workers keep running (launch.workers_outlive_job)", flush=True)
        launcher.release_lead()
    else:
        print("pdserve launch: stopping the cluster's actors", flush=True)
        launcher.stop_all()
        if _answers(launcher.config.redis_url or ""):  # not when the Redis was the launch's own (stopped last)
            launcher.release_lead()


def run_down(config: ClusterConfig) -> int:
    """`pdserve launch --down`: take the lead (a running launch steps down) and stop every actor."""
    import ray

    launcher = Launcher(config)
    launcher.connect()
    try:
        if _answers(config.redis_url or ""):
            launcher.take_lead()
        names = [n for n in launcher.observed() if parse_actor_name(n) is not None]
        launcher.stop_all()
        if _answers(config.redis_url or ""):
            launcher.release_lead()
        print(f"pdserve launch: stopped {len(names)} actors of cluster {config.cluster!r}", flush=True)
    finally:
        ray.shutdown()
    return 0
