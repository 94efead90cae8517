"""The planner runner: observe the cluster, ask the pure core, apply its decisions; one leader.

It runs inside the router process, as an asyncio task the app's lifespan starts and stops
(`pdserve serve --planner`), rather than as a Ray actor of its own: everything it reads and every
verb it uses is already there — ClusterAdmin (each worker's registry entry and its own Health,
SetRole) and the router-side TTFT/ITL windows, which exist only in the router's memory — and a
router Deployment outside Ray (Kubernetes) gets a planner without a Ray client. With several
routers each runs one, and a Redis lease (`Keys.planner()`, taken or renewed atomically with
its TTL, see Store.acquire_lease) elects the one that acts.

Each tick, every `interval_s`:
1. take or renew the lease; not the holder -> nothing more (its core's streaks start afresh once
   it becomes the leader: they were never built from this cluster's recent observations);
2. observe: ClusterAdmin.workers() -> one WorkerObs each (role, epoch, phase and the start times
   of recent switches from the worker's Health, load from its heartbeat), plus the p90 of TTFT
   and ITL over the last `latency_window_s`; time is the wall clock, as the workers' history;
3. decide: PlannerCore.decide(observation);
4. apply: SetRole through ClusterAdmin with `expected_epoch` (a worker that moved on refuses),
   `migrate` and `drain_timeout_s` as configured, after checking the lease once more. A refusal
   is logged; the next observation shows what the cluster actually did.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

from cluster.config import PlannerSettings
from cluster.errors import PdserveError
from cluster.metrics import RouterMetrics
from cluster.planner.core import Decision, Observation, PlannerCore, WorkerObs
from cluster.router.admin import SetRoleBody

logger = logging.getLogger(__name__)

MIN_LATENCY_SAMPLES = 5  # fewer samples in the window: no percentile (one slow request is not a trend)
RECENT_DECISIONS = 32


class AdminVerbs(Protocol):
    """What the runner needs of ClusterAdmin."""

    async def workers(self) -> list[dict[str, Any]]: ...

    async def set_role(self, worker_id: str, body: SetRoleBody) -> tuple[bool, dict[str, Any]]: ...


class LeaderLease(Protocol):
    """What the runner needs of the Store."""

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool: ...

    async def release_lease(self, holder: str) -> bool: ...


def worker_obs(w: dict[str, Any]) -> WorkerObs:
    """An admin worker object (GET /admin/workers) as the core sees it."""
    load = w.get("load") or {}
    starts = tuple(float(e["ts"]) for e in w.get("history") or () if e.get("phase") == "fenced")
    return WorkerObs(id=w["id"], role=w["role"], epoch=int(w["epoch"]), phase=w.get("phase") or "ready",
                     expert_parallel_size=int(w.get("expert_parallel_size") or 1),
                     running=int(load.get("running", 0)), waiting=int(load.get("waiting", 0)),
                     queued_prefill_tokens=int(load.get("queued_prefill_tokens", 0)),
                     kv_usage=float(load.get("kv_usage", 0.0)), switch_starts=starts,
                     ready=bool(w.get("ready", True)), reachable=bool(w.get("reachable", True)))


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PlannerRunner:
    """`start()` / `stop()` the loop; `tick()` is one round (tests call it directly)."""

    def __init__(self, admin: AdminVerbs, lease: LeaderLease, metrics: RouterMetrics, settings: PlannerSettings,
                 holder: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.admin = admin
        self.lease = lease
        self.metrics = metrics
        self.settings = settings
        self.holder = holder or default_holder()
        self.clock = clock
        self.core = PlannerCore(settings.core_config())
        self.leader = False
        self.last_observation: Observation | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self._task: asyncio.Task | None = None
        self._traced = False

    # ----- lifecycle -----
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="planner")
            logger.info("planner %s started (every %.1fs, SLO TTFT %s ms, ITL %s ms)", self.holder,
                        self.settings.interval_s, self.settings.slo_ttft_ms, self.settings.slo_itl_ms)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.leader:
            try:
                await self.lease.release_lease(self.holder)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                logger.warning("planner %s: releasing the lease: %s", self.holder, exc)
            self._set_leader(False)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - one failed round (Redis, a worker) must not end the planner
                logger.warning("planner tick failed: %s", exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            await asyncio.sleep(self.settings.interval_s)

    # ----- one round -----
    async def tick(self) -> list[Decision]:
        """Lease, observe, decide, apply; returns the decisions a worker started."""
        if not await self._hold():
            return []
        obs = await self.observe()
        decisions = self.core.decide(obs)
        if self.settings.trace_file:
            self._record(obs, decisions)
        started = []
        for decision in decisions:
            if not await self._hold():  # the round may have outlived the lease
                break
            if await self._apply(decision):
                started.append(decision)
        return started

    async def observe(self) -> Observation:
        workers = await self.admin.workers()
        m = self.metrics
        ttft = m.recent_ttft.percentile(0.9, min_samples=MIN_LATENCY_SAMPLES)
        itl = m.recent_itl.percentile(0.9, min_samples=MIN_LATENCY_SAMPLES)
        obs = Observation(now=self.clock(), workers=tuple(worker_obs(w) for w in workers),
                          ttft_p90_ms=None if ttft is None else ttft * 1000.0,
                          itl_p90_ms=None if itl is None else itl * 1000.0)
        self.last_observation = obs
        return obs

    def _record(self, obs: Observation, decisions: list[Decision]) -> None:
        """One JSON line per observation; a header with the core's config first (what a replay needs)."""
        lines = []
        if not self._traced:
            lines.append(json.dumps({"holder": self.holder, "config": asdict(self.core.config)}))
            self._traced = True
        lines.append(json.dumps({"observation": asdict(obs), "decisions": [asdict(d) for d in decisions]}))
        try:
            with open(self.settings.trace_file, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
                f.write("\n".join(lines) + "\n")
        except OSError as exc:
            logger.warning("planner: writing the trace to %s: %s", self.settings.trace_file, exc)

    async def _hold(self) -> bool:
        try:
            held = await self.lease.acquire_lease(self.holder, self.settings.lease_ttl_s)
        except Exception as exc:  # noqa: BLE001 - without Redis nobody can tell who leads: act as a follower
            logger.warning("planner %s: lease unavailable: %s", self.holder, exc)
            held = False
        if held != self.leader:
            logger.info("planner %s %s the leader lease", self.holder, "took" if held else "lost")
            self.core.reset()
            self._set_leader(held)
        return held

    def _set_leader(self, held: bool) -> None:
        self.leader = held
        self.metrics.planner_leader.set(1 if held else 0)

    async def _apply(self, d: Decision) -> bool:
        s = self.settings
        body = SetRoleBody(role=d.to_role, expected_epoch=d.expected_epoch, drain_timeout_s=s.drain_timeout_s,
                           migrate=s.migrate)
        record = {"ts": self.clock(), **asdict(d)}
        try:
            started, _ = await self.admin.set_role(d.worker_id, body)
        except PdserveError as exc:  # stale epoch, already switching, unreachable: the next round sees why
            logger.warning("planner: switching %s %s -> %s refused: %s", d.worker_id, d.from_role, d.to_role, exc)
            self.recent.append({**record, "started": False, "error": str(exc)})
            return False
        logger.info("planner: switching %s %s -> %s at epoch %d (%s)", d.worker_id, d.from_role, d.to_role,
                    d.expected_epoch, d.reason)
        self.recent.append({**record, "started": started, "error": ""})
        if started:
            self.metrics.planner_decisions.labels(d.to_role).inc()
        return started

    def status(self) -> dict[str, Any]:
        """GET /admin/planner: who leads, what was seen last, what was decided recently."""
        obs = self.last_observation
        return {"enabled": True, "holder": self.holder, "leader": self.leader,
                "settings": self.settings.model_dump(), "streaks": self.core.streaks, "note": self.core.note,
                "last_observation": None if obs is None else asdict(obs), "decisions": list(self.recent)}
