"""The planner runner against a real Redis (the leader lease) and a stand-in ClusterAdmin that
switches like the real one (expected epoch checked, the switch visible in the worker's phase and
history); the router-side latency windows; the planner and role-switch metrics."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import generate_latest

from cluster.config import ClusterConfig, PlannerSettings
from cluster.errors import ConflictError
from cluster.metrics import LatencyWindow, RouterMetrics
from cluster.planner.runner import PlannerRunner, worker_obs
from cluster.router.admin import SetRoleBody
from cluster.state.store import Store
from cluster.worker.roles import RoleMachine
from cluster.worker.stats import stats_response
from engine.llm_engine import EngineStats
from pdserve.v1 import worker_pb2

CLUSTER = "plannertest"
FAST = dict(enabled=True, interval_s=0.05, lease_ttl_s=0.4, hysteresis=1, cooldown_s=0, global_cooldown_s=0,
            prefill_queue_tokens_high=1000, decode_seqs_high=8, migrate=True, drain_timeout_s=5.0)


class FakeAdmin:
    """ClusterAdmin's two verbs over in-memory workers. A switch is recorded (who asked, with which
    body) and shows as phase `fenced` with a `fenced` history event, as a real worker's Health does,
    until `finish()` completes it."""

    def __init__(self, queue: int = 5000) -> None:
        now = time.time()
        self.w = {wid: {"id": wid, "role": role, "epoch": 1, "phase": "ready", "ready": True, "reachable": True,
                        "expert_parallel_size": 1, "history": [{"phase": "ready", "ts": now}],
                        "load": {"running": 0, "waiting": 0, "queued_prefill_tokens": queue if role == "prefill" else 0,
                                 "kv_usage": 0.1}}
                  for wid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode"))}
        self.calls: list[tuple[str, SetRoleBody]] = []
        self.refuse = False

    async def workers(self) -> list[dict[str, Any]]:
        return [dict(w) for w in self.w.values()]

    async def set_role(self, worker_id: str, body: SetRoleBody) -> tuple[bool, dict[str, Any]]:
        w = self.w[worker_id]
        if self.refuse or body.expected_epoch != w["epoch"]:
            raise ConflictError(f"worker {worker_id} is at epoch {w['epoch']}", code="stale_epoch")
        self.calls.append((worker_id, body))
        w.update(phase="fenced", target=body.role, history=w["history"] + [{"phase": "fenced", "ts": time.time()}])
        return True, dict(w)

    def finish(self) -> None:
        for w in self.w.values():
            if w["phase"] == "fenced":
                w.update(phase="ready", role=w.pop("target"), epoch=w["epoch"] + 1)


def runner(admin, store, holder: str, **settings) -> PlannerRunner:
    return PlannerRunner(admin, store, RouterMetrics(), PlannerSettings(**{**FAST, **settings}), holder=holder)


def samples(metrics: RouterMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_tick_switches_through_the_admin_verb_with_the_expected_epoch_and_counts_it(redis_url):
    async def body():
        store = Store.from_url(redis_url, CLUSTER)
        admin = FakeAdmin()
        r = runner(admin, store, "r1")
        try:
            (d,) = await r.tick()
            assert (d.worker_id, d.from_role, d.to_role, d.expected_epoch) == ("d0", "decode", "prefill", 1)
            ((wid, sent),) = admin.calls
            assert (wid, sent.role, sent.expected_epoch, sent.migrate, sent.drain_timeout_s) == \
                ("d0", "prefill", 1, True, 5.0)
            # Mid-switch: nothing more, however long the pressure lasts.
            assert await r.tick() == [] and "mid-switch" in r.core.note
            admin.finish()
            assert await r.tick() == [] and "decode at its minimum" in r.core.note  # 2P + 1D now
            values = samples(r.metrics)
            assert values['pdserve:planner_decisions_total{to="prefill"}'] == 1
            assert values["pdserve:planner_leader"] == 1
            status = r.status()
            assert status["leader"] and status["decisions"][0]["worker_id"] == "d0"
            assert {x["id"] for x in status["last_observation"]["workers"]} == {"p0", "d0", "d1"}
        finally:
            await r.stop()
            await store.close()

    asyncio.run(body())


def test_a_refused_switch_is_not_counted_and_is_decided_again(redis_url):
    async def body():
        store = Store.from_url(redis_url, CLUSTER)
        admin = FakeAdmin()
        admin.refuse = True
        r = runner(admin, store, "r1")
        try:
            assert await r.tick() == [] and await r.tick() == []
            assert admin.calls == [] and [x["started"] for x in r.recent] == [False, False]
            assert "epoch" in r.recent[0]["error"]
            assert 'pdserve:planner_decisions_total{to="prefill"}' not in samples(r.metrics)
            admin.refuse = False
            assert [d.worker_id for d in await r.tick()] == ["d0"]
        finally:
            await r.stop()
            await store.close()

    asyncio.run(body())


def test_the_leader_lease_admits_one_runner_and_hands_over_when_it_goes(redis_url):
    """Two routers' planners on one cluster: only the lease holder switches anything; when it stops
    (lease released) or dies (lease left to expire), the other one takes over."""
    async def body():
        admin = FakeAdmin()
        s1, s2, s3 = (Store.from_url(redis_url, CLUSTER) for _ in range(3))
        a, b = runner(admin, s1, "router-a"), runner(admin, s2, "router-b")
        try:
            await a.start()
            await b.start()
            deadline = time.monotonic() + 10
            while not admin.calls and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(admin.calls) == 1  # one switch, by one of them; the other is blocked by the lease
            leader, follower = (a, b) if a.leader else (b, a)
            assert leader.leader and not follower.leader and await s3.lease_holder() == leader.holder
            assert [x["worker_id"] for x in follower.recent] == []
            await asyncio.sleep(0.3)  # many ticks of both
            assert not follower.leader and len(admin.calls) == 1

            await leader.stop()  # releases the lease: the follower leads from its next tick
            deadline = time.monotonic() + 5
            while not follower.leader and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert follower.leader and await s3.lease_holder() == follower.holder
            admin.finish()
            assert samples(leader.metrics)["pdserve:planner_leader"] == 0

            # The follower "dies" without releasing: its lease expires and a third planner takes over.
            follower._task.cancel()
            c = runner(admin, s3, "router-c")
            assert await c.tick() == [] and not c.leader
            deadline = time.monotonic() + 10
            while await s3.lease_holder() is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # until Redis has expired the dead planner's lease
            await c.tick()
            assert c.leader and await s3.lease_holder() == "router-c"
        finally:
            for r in (a, b):
                await r.stop()
            for s in (s1, s2, s3):
                await s.close()

    asyncio.run(body())


def test_worker_obs_reads_the_admin_object():
    obj = {"id": "d0", "role": "decode", "epoch": 3, "phase": "ready", "ready": True, "reachable": True,
           "expert_parallel_size": 2, "load": {"running": 4, "waiting": 1, "queued_prefill_tokens": 7, "kv_usage": 0.5},
           "history": [{"phase": p, "ts": t} for p, t in (("ready", 1.0), ("fenced", 5.0), ("switching", 6.0),
                                                          ("ready", 7.0), ("fenced", 9.0), ("rolling_back", 9.5))]}
    o = worker_obs(obj)
    assert (o.id, o.role, o.epoch, o.expert_parallel_size, o.running, o.waiting, o.queued_prefill_tokens,
            o.kv_usage) == ("d0", "decode", 3, 2, 4, 1, 7, 0.5)
    assert o.switch_starts == (5.0, 9.0) and o.last_switch == 9.0  # a rolled-back switch counts too
    unreachable = worker_obs({"id": "d1", "role": "decode", "epoch": 1, "phase": "ready", "reachable": False,
                              "load": {}})
    assert not unreachable.serving and unreachable.switch_starts == ()


def test_latency_window_percentiles_forget_old_samples():
    win = LatencyWindow(window_s=10)
    for i in range(1, 11):
        win.observe(i / 10, now=100.0 + i)
    assert win.percentile(0.9, now=110.0) == 0.9
    assert win.percentile(0.5, now=110.0) == 0.5
    assert win.percentile(0.9, now=115.5) == 1.0  # samples older than 10 s are gone: 0.6 ... 1.0 left
    assert win.percentile(0.9, now=115.5, min_samples=6) is None
    assert win.percentile(0.9, now=200.0) is None


def test_request_tracker_feeds_the_latency_windows():
    m = RouterMetrics()
    t = m.track([5], n=1, arrival=time.perf_counter())
    for _ in range(3):
        t.on_chunk(0, worker_pb2.TokenChunk(token_ids=[1]))
    t.on_chunk(0, worker_pb2.TokenChunk(token_ids=[2], finish_reason=worker_pb2.FINISH_REASON_LENGTH))
    assert len(m.recent_ttft) == 1 and len(m.recent_itl) == 3


def test_role_switch_metrics_by_direction_and_workers_per_role():
    m = RoleMachine("w1", "decode", now=0.0)
    for t, target in enumerate(("prefill", "decode", "prefill"), start=1):
        m.begin(target, 0, float(t))
        m.enter("switching", t + 0.1)
        m.complete(t + 0.2)
    assert m.switch_counts == {("decode", "prefill"): 2, ("prefill", "decode"): 1} and m.switches_total == 3
    pb = {"prefill": worker_pb2.ROLE_PREFILL, "decode": worker_pb2.ROLE_DECODE}
    counts = {(pb[a], pb[b]): n for (a, b), n in m.switch_counts.items()}
    stats = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    metrics = RouterMetrics()
    metrics.workers.latest = [
        stats_response("w1", worker_pb2.ROLE_PREFILL, 4, stats, role_switch_counts=counts, role_switches_total=3),
        stats_response("w2", worker_pb2.ROLE_DECODE, 1, stats),
        stats_response("w3", worker_pb2.ROLE_DECODE, 1, stats),
    ]
    values = samples(metrics)
    assert values['pdserve:role_switches_total{from="decode",to="prefill",worker="w1"}'] == 2
    assert values['pdserve:role_switches_total{from="prefill",to="decode",worker="w1"}'] == 1
    assert not any(k.startswith("pdserve:role_switches_total") and 'worker="w2"' in k for k in values)
    assert values['pdserve:num_workers{role="decode"}'] == 2
    assert values['pdserve:num_workers{role="prefill"}'] == 1
    assert values['pdserve:num_workers{role="mixed"}'] == 0


def test_switch_phase_histograms_and_migrated_sequences_per_worker():
    m = RoleMachine("w1", "decode", now=0.0)
    m.begin("prefill", 0, 1.0)
    m.enter("migrating", 1.003)
    m.enter("switching", 1.2)
    m.complete(1.25)
    stats = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    metrics = RouterMetrics()
    metrics.workers.latest = [stats_response("w1", worker_pb2.ROLE_PREFILL, 2, stats, phase_durations=m.durations,
                                             sequences_migrated_total=3),
                              stats_response("w2", worker_pb2.ROLE_DECODE, 1, stats)]
    values = samples(metrics)
    h = "pdserve:role_switch_phase_seconds"
    assert values[f'{h}_count{{phase="migrating",worker="w1"}}'] == 1
    assert values[f'{h}_sum{{phase="migrating",worker="w1"}}'] == pytest.approx(0.197)
    assert values[f'{h}_bucket{{le="0.1",phase="migrating",worker="w1"}}'] == 0
    assert values[f'{h}_bucket{{le="0.25",phase="migrating",worker="w1"}}'] == 1
    assert values[f'{h}_bucket{{le="+Inf",phase="migrating",worker="w1"}}'] == 1
    assert values[f'{h}_bucket{{le="0.005",phase="fenced",worker="w1"}}'] == 1
    assert values[f'{h}_sum{{phase="total",worker="w1"}}'] == pytest.approx(0.25)
    assert not any(k.startswith(h) and 'worker="w2"' in k for k in values)  # no switch, no series
    assert values['pdserve:sequences_migrated_total{role="prefill",worker="w1"}'] == 3
    assert values['pdserve:sequences_migrated_total{role="decode",worker="w2"}'] == 0


def test_planner_settings_from_yaml_and_their_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("planner:\n  enabled: true\n  slo_ttft_ms: 800\n  hysteresis: 2\n")
    cfg = ClusterConfig.from_yaml(path)
    assert cfg.planner.enabled and cfg.planner.core_config().slo_ttft_ms == 800 and cfg.planner.hysteresis == 2
    assert ClusterConfig.model_validate({"planner": True}).planner.enabled
    assert not ClusterConfig().planner.enabled
    with pytest.raises(ValueError, match="lease_ttl_s"):
        PlannerSettings(interval_s=10, lease_ttl_s=5)
    with pytest.raises(ValueError):
        PlannerSettings(bogus=1)


def test_cli_flags_turn_the_planner_on_over_a_yaml_config(tmp_path):
    from cluster.cli import _serve_config, build_parser

    path = tmp_path / "c.yaml"
    path.write_text("planner:\n  interval_s: 2\n  slo_itl_ms: 80\n")
    parse = build_parser().parse_args
    cfg = _serve_config(parse(["serve", "--config", str(path), "--planner", "--slo-ttft-ms", "400"]))
    assert (cfg.planner.enabled, cfg.planner.slo_ttft_ms, cfg.planner.slo_itl_ms, cfg.planner.interval_s) == \
        (True, 400, 80, 2)
    assert not _serve_config(parse(["serve"])).planner.enabled
    assert _serve_config(parse(["serve", "--planner", "--slo-itl-ms", "50"])).planner.slo_itl_ms == 50
