"""The planner core without I/O: single observations, then traces replayed through it.

Traces come two ways: `SimCluster` closes the loop (workers carry a decision out as real ones do:
fenced for a few observations, then ready in the new role at epoch + 1, with the switch in their
history) under a demand that shifts between prefill-heavy and decode-heavy; and a trace recorded
from the real cluster of tests/integration/test_planner.py (tests/unit/data/) is replayed as is.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.planner.core import (Decision, Observation, PlannerConfig, PlannerCore, WorkerObs, observation_from_dict,
                                  pressure)

DATA = Path(__file__).parent / "data"
CFG = PlannerConfig(hysteresis=3, cooldown_s=60, global_cooldown_s=20, max_switches_per_window=3, window_s=300,
                    prefill_queue_tokens_high=1000, decode_seqs_high=8, kv_usage_high=0.85)


def w(wid: str, role: str = "decode", epoch: int = 1, **kw) -> WorkerObs:
    return WorkerObs(id=wid, role=role, epoch=epoch, **kw)  # type: ignore[arg-type]


def obs(now: float, *workers: WorkerObs, ttft: float | None = None, itl: float | None = None) -> Observation:
    return Observation(now=now, workers=tuple(workers), ttft_p90_ms=ttft, itl_p90_ms=itl)


def prefill_heavy(now: float, queue: int = 5000) -> Observation:
    """1 prefill worker drowning in prompts, 3 decode workers with little to do."""
    return obs(now, w("p0", "prefill", queued_prefill_tokens=queue, running=2),
               w("d0", running=3, kv_usage=0.2), w("d1", running=1, kv_usage=0.1), w("d2", running=2, kv_usage=0.1))


def decode_heavy(now: float) -> Observation:
    """3 prefill workers idle, 1 decode worker with many streams."""
    return obs(now, w("p0", "prefill", queued_prefill_tokens=300), w("p1", "prefill", queued_prefill_tokens=0),
               w("p2", "prefill", queued_prefill_tokens=100), w("d0", running=20, waiting=4, kv_usage=0.6))


def run(core: PlannerCore, observations) -> list[list[Decision]]:
    return [core.decide(o) for o in observations]


# ----- single observations -----
def test_prefill_pressure_switches_the_least_loaded_decode_worker_after_the_hysteresis():
    core = PlannerCore(CFG)
    out = run(core, [prefill_heavy(t) for t in (0, 1, 2)])
    assert out[0] == out[1] == []
    (d,) = out[2]
    assert (d.worker_id, d.from_role, d.to_role, d.expected_epoch) == ("d1", "decode", "prefill", 1)
    assert "queued prefill tokens 5000/worker > 1000" in d.reason


def test_decode_pressure_switches_the_prefill_worker_with_the_shortest_queue():
    core = PlannerCore(CFG)
    (d,) = run(core, [decode_heavy(t) for t in (0, 1, 2)])[2]
    assert (d.worker_id, d.from_role, d.to_role) == ("p1", "prefill", "decode")
    assert "sequences 24.0/decode worker > 8" in d.reason


def test_one_quiet_observation_restarts_the_hysteresis():
    core = PlannerCore(CFG)
    quiet = prefill_heavy(2, queue=200)
    out = run(core, [prefill_heavy(0), prefill_heavy(1), quiet, prefill_heavy(3), prefill_heavy(4)])
    assert out == [[]] * 5
    assert core.decide(prefill_heavy(5)) and core.streaks == {"prefill": 0, "decode": 0}


def test_kv_usage_alone_is_decode_pressure():
    full = obs(0, w("p0", "prefill"), w("p1", "prefill"), w("d0", running=2, kv_usage=0.95),
               w("d1", running=2, kv_usage=0.9))
    press = pressure(full, CFG)
    assert press.side == "decode" and press.decode == ("KV usage 0.93 > 0.85",)


@pytest.mark.parametrize("ttft, itl, side", [
    (900, 40, "prefill"),   # TTFT over its SLO, ITL well under: more prefill
    (900, 95, None),        # both hurt (ITL has no slack): moving a worker moves the pain
    (300, 120, "decode"),   # ITL over, TTFT has slack: more decode
    (900, None, "prefill"),  # no ITL samples yet count as slack
    (None, None, None),     # no traffic, no signal
])
def test_slo_signals_need_slack_on_the_other_side(ttft, itl, side):
    cfg = replace(CFG, slo_ttft_ms=500, slo_itl_ms=100)
    calm = obs(0, w("p0", "prefill"), w("p1", "prefill"), w("d0", running=1), w("d1", running=1),
               ttft=ttft, itl=itl)
    assert pressure(calm, cfg).side == side
    core = PlannerCore(replace(cfg, hysteresis=1, min_prefill=1, min_decode=1))
    decided = core.decide(calm)
    assert [d.to_role for d in decided] == ([side] if side else [])


def test_pressure_on_both_sides_decides_nothing():
    both = obs(0, w("p0", "prefill", queued_prefill_tokens=9000), w("d0", running=30), w("d1", running=30))
    core = PlannerCore(replace(CFG, hysteresis=1))
    assert core.decide(both) == [] and core.note == "both sides under pressure"


def test_the_minimum_per_role_is_kept_and_mixed_workers_count_on_both_sides():
    core = PlannerCore(replace(CFG, hysteresis=1))
    lone = obs(0, w("p0", "prefill", queued_prefill_tokens=9000), w("d0", running=0))
    assert core.decide(lone) == [] and "decode at its minimum" in core.note
    # A mixed worker serves decode too: the decode worker may go; the mixed one is never touched.
    with_mixed = obs(0, w("p0", "prefill", queued_prefill_tokens=9000), w("d0", running=0), w("m0", "mixed"))
    (d,) = core.decide(with_mixed)
    assert (d.worker_id, d.to_role) == ("d0", "prefill")
    only_mixed = obs(0, w("p0", "prefill", queued_prefill_tokens=9000), w("m0", "mixed"), w("m1", "mixed"))
    assert core.decide(only_mixed) == []
    allowed = PlannerCore(replace(CFG, hysteresis=1, switch_mixed=True))
    assert [d.worker_id for d in allowed.decide(only_mixed)] == ["m0"]
    strict = PlannerCore(replace(CFG, hysteresis=1, min_decode=2))
    assert strict.decide(with_mixed) == [] and "min 2" in strict.note


def test_the_donor_side_is_not_pushed_over_its_own_threshold():
    core = PlannerCore(replace(CFG, hysteresis=1))
    # 2 decode workers with 5 sequences each: one alone would carry 10 > 0.8 x 8.
    busy = obs(0, w("p0", "prefill", queued_prefill_tokens=5000), w("d0", running=5), w("d1", running=5))
    assert core.decide(busy) == [] and "decode would be overloaded" in core.note
    lighter = obs(1, w("p0", "prefill", queued_prefill_tokens=5000), w("d0", running=3), w("d1", running=3))
    assert [d.worker_id for d in core.decide(lighter)] == ["d0"]


def test_a_worker_mid_switch_blocks_decisions_and_restarts_the_hysteresis():
    core = PlannerCore(CFG)
    run(core, [prefill_heavy(0), prefill_heavy(1)])
    assert core.streaks["prefill"] == 2
    moving = prefill_heavy(2)
    moving = replace(moving, workers=moving.workers[:-1] + (replace(moving.workers[-1], phase="draining"),))
    assert core.decide(moving) == [] and "d2" in core.note and core.streaks["prefill"] == 0
    assert run(core, [prefill_heavy(3), prefill_heavy(4)]) == [[], []]  # two fresh observations are not enough
    assert len(core.decide(prefill_heavy(5))) == 1


def test_cooldowns_and_the_window_cap_come_from_the_observed_history():
    core = PlannerCore(replace(CFG, hysteresis=1))

    def with_history(now, starts_by_worker):
        o = prefill_heavy(now)
        return replace(o, workers=tuple(replace(x, switch_starts=starts_by_worker.get(x.id, ())) for x in o.workers))

    # A manual switch of p0 10 s ago: the global cooldown (20 s) holds everything back.
    assert core.decide(with_history(100, {"p0": (90.0,)})) == [] and "global cooldown" in core.note
    # d1 (the least loaded) switched 40 s ago: still in its own cooldown (60 s), so d2 goes.
    assert [d.worker_id for d in core.decide(with_history(100, {"d1": (60.0,)}))] == ["d2"]
    # Three switches began in the window (300 s): capped until the oldest ages out.
    three = {"d0": (10.0,), "d2": (50.0,), "p0": (70.0,)}
    assert core.decide(with_history(200, three)) == [] and "cap 3" in core.note
    assert [d.worker_id for d in core.decide(with_history(311, three))] == ["d1"]


def test_workers_that_do_not_serve_are_neither_candidates_nor_counted():
    core = PlannerCore(replace(CFG, hysteresis=1))
    o = obs(0, w("p0", "prefill", queued_prefill_tokens=5000), w("d0", running=0, reachable=False),
            w("d1", running=0, phase="failed"), w("d2", running=1))
    assert core.decide(o) == [] and "decode at its minimum (1 serving" in core.note


def test_an_expert_parallel_group_is_one_unit_and_the_smaller_unit_goes_first():
    core = PlannerCore(replace(CFG, hysteresis=1))
    o = obs(0, w("p0", "prefill", queued_prefill_tokens=5000), w("d-ep4", running=1, expert_parallel_size=4),
            w("d-ep2", running=1, expert_parallel_size=2), w("d-busy", running=3))
    (d,) = core.decide(o)
    assert d.worker_id == "d-ep2"  # one decision for the whole group, never one per rank


def test_bad_config_is_a_value_error():
    for bad in (dict(hysteresis=0), dict(slo_ttft_ms=0), dict(kv_usage_high=1.5), dict(min_decode=-1),
                dict(window_s=0), dict(margin=0)):
        with pytest.raises(ValueError):
            PlannerConfig(**bad)


# ----- closed-loop traces -----
class SimCluster:
    """Workers that carry a decision out as real ones do: a switch begins (fenced, recorded in the
    worker's history) and ends `switch_s` later in the new role at epoch + 1. The demand (queued
    prompt tokens, decode sequences) is spread evenly over the workers serving each side."""

    def __init__(self, roles: dict[str, str], switch_s: float = 2.0) -> None:
        self.w = {wid: {"role": role, "epoch": 1, "phase": "ready", "starts": [], "to": None, "done": 0.0}
                  for wid, role in roles.items()}
        self.switch_s = switch_s
        self.applied: list[tuple[float, str, str, str]] = []

    def apply(self, d: Decision, now: float) -> None:
        s = self.w[d.worker_id]
        assert s["phase"] == "ready" and s["epoch"] == d.expected_epoch and s["role"] == d.from_role
        s.update(phase="draining", to=d.to_role, done=now + self.switch_s)
        s["starts"].append(now)
        self.applied.append((now, d.worker_id, d.from_role, d.to_role))

    def observe(self, now: float, queue: int, seqs: int) -> Observation:
        for s in self.w.values():
            if s["phase"] != "ready" and now >= s["done"]:
                s.update(phase="ready", role=s["to"], epoch=s["epoch"] + 1, to=None)
        pre = [k for k, s in self.w.items() if s["role"] == "prefill" and s["phase"] == "ready"]
        dec = [k for k, s in self.w.items() if s["role"] == "decode" and s["phase"] == "ready"]
        workers = []
        for k, s in self.w.items():
            q = queue // len(pre) if k in pre else 0
            n = seqs // len(dec) if k in dec else 0
            workers.append(w(k, s["role"], s["epoch"], phase=s["phase"], queued_prefill_tokens=q, running=n,
                             kv_usage=min(1.0, n / 40), switch_starts=tuple(s["starts"])))
        return obs(now, *workers)

    def roles(self) -> list[str]:
        return sorted(s["role"] for s in self.w.values())


def replay(sim: SimCluster, core: PlannerCore, demand, step_s: float = 5.0, start: float = 1000.0):
    """Feed `demand` [(queue, seqs), ...] one observation per `step_s`; apply what the core decides."""
    for i, (queue, seqs) in enumerate(demand):
        now = start + i * step_s
        for d in core.decide(sim.observe(now, queue, seqs)):
            sim.apply(d, now)


def test_a_phase_shifting_trace_moves_workers_toward_the_heavy_phase_and_back():
    sim = SimCluster({"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"})
    core = PlannerCore(CFG)
    prefill_phase = [(6000, 6)] * 40   # long prompts, short outputs: 200 s
    decode_phase = [(200, 30)] * 40    # short prompts, long outputs
    replay(sim, core, prefill_phase + decode_phase)
    directions = [(frm, to) for _, _, frm, to in sim.applied]
    # Prefill-heavy: decode -> prefill until decode is at its minimum (3 moves would leave 0 decode).
    assert directions[:2] == [("decode", "prefill")] * 2
    assert all(d == ("prefill", "decode") for d in directions[2:]) and len(directions) >= 3
    times = [t for t, *_ in sim.applied]
    assert all(b - a >= CFG.global_cooldown_s for a, b in zip(times, times[1:]))
    for wid in sim.w:  # nobody is switched again within its cooldown
        own = [t for t, x, *_ in sim.applied if x == wid]
        assert all(b - a >= CFG.cooldown_s for a, b in zip(own, own[1:]))
    assert sim.roles().count("decode") >= 2  # the decode-heavy phase got decode workers back


def test_flapping_demand_causes_no_flapping():
    sim = SimCluster({"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"})
    core = PlannerCore(CFG)
    # The mix flips every observation, and then every two: never 3 in a row of either.
    flips = [(6000, 2) if i % 2 else (0, 30) for i in range(60)]
    pairs = [(6000, 2) if (i // 2) % 2 else (0, 30) for i in range(60)]
    replay(sim, core, flips + pairs)
    assert sim.applied == []


def test_a_long_oscillation_is_held_to_the_cooldowns_and_the_cap():
    sim = SimCluster({"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"})
    core = PlannerCore(CFG)
    # The mix flips every 4 observations (20 s) for 30 minutes: pressure persists long enough to act.
    demand = [(6000, 3) if (i // 4) % 2 else (0, 60) for i in range(360)]
    replay(sim, core, demand)
    times = [t for t, *_ in sim.applied]
    assert times, "a persistent pressure must still be acted on"
    for t in times:  # never more than the cap within any window
        assert sum(1 for u in times if t - CFG.window_s < u <= t) <= CFG.max_switches_per_window
    assert all(b - a >= CFG.global_cooldown_s for a, b in zip(times, times[1:]))
    assert len(times) <= CFG.max_switches_per_window * (360 * 5 // CFG.window_s + 1)


def test_a_refused_switch_is_decided_again_from_what_is_observed():
    """The core does not remember its decisions: a switch that never happened (the worker's epoch
    moved, the call failed) shows in the next observations as nothing changed, and the pressure,
    persisting, leads to the same decision again."""
    core = PlannerCore(CFG)
    first = run(core, [prefill_heavy(t) for t in range(3)])[2]
    again = run(core, [prefill_heavy(t) for t in range(3, 6)])[2]
    assert first == again and len(first) == 1


# ----- a trace recorded from a real cluster -----
def test_the_recorded_integration_trace_replays_to_the_same_decisions():
    """tests/unit/data/planner_trace.jsonl: every observation the planner of
    tests/integration/test_planner.py made (1 prefill + 2 decode workers, a prefill-heavy phase
    then a decode-heavy one) and what it decided. Replayed through a fresh core with the recorded
    settings, the decisions come out the same, at the same observations."""
    lines = [json.loads(x) for x in (DATA / "planner_trace.jsonl").read_text().splitlines() if x.strip()]
    header, records = lines[0], lines[1:]
    core = PlannerCore(PlannerConfig(**header["config"]))
    replayed = [[d.__dict__ for d in core.decide(observation_from_dict(r["observation"]))] for r in records]
    assert replayed == [r["decisions"] for r in records]
    directions = [(d["from_role"], d["to_role"]) for ds in replayed for d in ds]
    assert directions == [("decode", "prefill"), ("prefill", "decode")]
