"""The worker's role state machine, without I/O: phases, admission, epochs, rollback."""
from __future__ import annotations

import pytest

from cluster.worker.roles import RoleMachine, SwitchRefused


def machine(role: str = "decode") -> RoleMachine:
    return RoleMachine("w1", role, now=0.0)


def test_a_switch_walks_the_phases_and_bumps_the_epoch_once():
    m = machine("decode")
    assert m.ready and m.epoch == 1
    assert m.begin("prefill", expected_epoch=1, now=1.0)
    m.enter("draining", 2.0)
    m.enter("switching", 3.0)
    assert m.role == "decode" and m.epoch == 1  # nothing flips before the end
    assert m.complete(4.0) == 2
    assert (m.role, m.epoch, m.phase, m.target_role) == ("prefill", 2, "ready", None)
    assert [(e.phase, e.ts) for e in m.history] == [
        ("ready", 0.0), ("fenced", 1.0), ("draining", 2.0), ("switching", 3.0), ("ready", 4.0)]
    assert m.switches_total == 1


def test_switch_to_the_current_role_is_a_no_op():
    m = machine("mixed")
    assert m.begin("mixed", expected_epoch=1, now=1.0) is False
    assert m.ready and m.epoch == 1 and len(m.history) == 1


@pytest.mark.parametrize("expected", [2, 7])
def test_wrong_expected_epoch_is_refused(expected):
    m = machine()
    with pytest.raises(SwitchRefused) as err:
        m.begin("prefill", expected_epoch=expected, now=1.0)
    assert err.value.code == "stale_epoch" and "epoch 1" in str(err.value)
    assert m.ready


def test_a_second_switch_while_one_runs_is_refused():
    m = machine()
    m.begin("prefill", 1, now=1.0)
    with pytest.raises(SwitchRefused) as err:
        m.begin("mixed", 1, now=1.5)
    assert err.value.code == "busy" and "already switching" in str(err.value)
    # Even a switch "back" to the current role is refused while one runs: it would race the flip.
    with pytest.raises(SwitchRefused):
        m.begin("decode", 1, now=1.5)


def test_unknown_role_is_refused():
    with pytest.raises(SwitchRefused) as err:
        machine().begin("router", 0, now=1.0)
    assert err.value.code == "invalid"
    with pytest.raises(ValueError):
        RoleMachine("w", "router", now=0.0)  # type: ignore[arg-type]


def test_admission_during_a_switch_keeps_only_what_both_roles_serve():
    m = machine("mixed")
    m.begin("decode", 1, now=1.0)
    assert m.admit("decode", 1) is None  # a mixed worker turning decode keeps taking Decode calls
    for kind in ("prefill", "generate"):
        r = m.admit(kind, 1)
        assert r is not None and r.code == "failed_precondition" and "switching from mixed to decode" in r.message
    assert m.lost_kinds() == {"prefill", "generate"}

    d = machine("decode")
    d.begin("prefill", 1, now=1.0)
    assert d.admit("decode", 1) is not None and d.admit("prefill", 1) is not None  # nothing in common


def test_admission_checks_epoch_role_failure_and_shutdown():
    m = machine("prefill")
    assert m.admit("prefill", 0) is None and m.admit("prefill", 1) is None
    stale = m.admit("prefill", 3)
    assert stale is not None and stale.code == "failed_precondition" and "epoch 1" in stale.message
    wrong = m.admit("decode", 1)
    assert wrong is not None and "needs decode or mixed" in wrong.message
    m.fail("rank 1 died", now=2.0)
    dead = m.admit("prefill", 1)
    assert dead is not None and dead.code == "unavailable" and "rank 1 died" in dead.message
    with pytest.raises(SwitchRefused) as err:
        m.begin("decode", 1, now=3.0)
    assert err.value.code == "unavailable"

    s = machine("prefill")
    s.stop(now=1.0)
    r = s.admit("prefill", 1)
    assert r is not None and r.code == "unavailable" and "shutting down" in r.message


def test_after_a_switch_the_old_epoch_is_stale():
    m = machine("prefill")
    m.begin("decode", 1, now=1.0)
    m.enter("switching", 2.0)
    m.complete(3.0)
    assert m.admit("decode", 1) is not None  # the router's view predates the switch: re-route
    assert m.admit("decode", 2) is None
    assert m.admit("prefill", 2) is not None


@pytest.mark.parametrize("failed_in", ["fenced", "draining", "migrating", "switching"])
def test_rollback_returns_to_the_old_role_at_the_same_epoch(failed_in):
    m = machine("decode")
    m.begin("prefill", 1, now=1.0)
    path = {"fenced": [], "draining": ["draining"], "migrating": ["migrating"],
            "switching": ["draining", "switching"]}[failed_in]
    for i, phase in enumerate(path):
        m.enter(phase, 2.0 + i)  # type: ignore[arg-type]
    m.rollback("drain timed out with 3 sequences running", now=5.0)
    assert m.phase == "rolling_back" and not m.ready
    assert m.admit("decode", 1) is not None  # still fenced while it backs out
    m.rolled_back(True, now=6.0)
    assert (m.role, m.epoch, m.phase) == ("decode", 1, "ready")
    assert "drain timed out" in m.reason and m.rollbacks_total == 1 and m.switches_total == 0
    assert m.admit("decode", 1) is None
    assert [e.phase for e in m.history][-2:] == ["rolling_back", "ready"]


def test_a_failed_rollback_leaves_the_worker_failed_and_says_why():
    m = machine("decode")
    m.begin("prefill", 1, now=1.0)
    m.rollback("registry write failed", now=2.0)
    m.rolled_back(False, now=3.0, note="could not re-register")
    assert m.phase == "failed" and "registry write failed" in m.reason and "re-register" in m.reason
    r = m.admit("decode", 1)
    assert r is not None and r.code == "unavailable"


def test_transitions_off_the_map_are_refused():
    m = machine()
    with pytest.raises(ValueError):
        m.enter("switching", 1.0)  # not switching at all
    with pytest.raises(ValueError):
        m.complete(1.0)
    with pytest.raises(ValueError):
        m.rollback("x", 1.0)
    m.begin("prefill", 1, now=1.0)
    with pytest.raises(ValueError):
        m.enter("ready", 2.0)  # only complete() or rolled_back() end a switch
    with pytest.raises(ValueError):
        m.complete(2.0)  # not yet in switching
    m.enter("migrating", 2.0)
    with pytest.raises(ValueError):
        m.enter("draining", 3.0)  # migration does not go back to a plain drain


def test_history_is_bounded():
    m = machine("prefill")
    for i in range(40):
        target = "decode" if m.role == "prefill" else "prefill"
        m.begin(target, 0, now=float(i))
        m.enter("switching", i + 0.5)
        m.complete(i + 0.9)
    assert m.epoch == 41 and len(m.history) == 32 and m.switches_total == 40


def test_phase_durations_are_kept_per_phase_with_fence_to_ready_as_total():
    m = machine("decode")
    m.begin("prefill", 0, now=10.0)
    m.enter("migrating", 10.002)
    m.enter("switching", 12.0)
    m.complete(12.004)
    m.begin("decode", 0, now=20.0)
    m.enter("draining", 20.0)
    m.rollback("drain timed out", now=80.0)
    m.rolled_back(True, now=80.05)
    d = m.durations
    assert {p: d.count(p) for p in d.counts} == {"fenced": 2, "migrating": 1, "draining": 1, "switching": 1,
                                                 "rolling_back": 1, "total": 1, "total_rolled_back": 1}
    assert d.sums["total"] == pytest.approx(2.004) and d.sums["draining"] == pytest.approx(60.0)
    assert d.sums["total_rolled_back"] == pytest.approx(60.05)
    # Bucketed by upper bound: 2 ms lands in the 5 ms bucket, ~2 s in the 2.5 s one, 60 s in the 60 s one.
    assert d.counts["fenced"][d.buckets.index(0.005)] == 1 and d.counts["migrating"][d.buckets.index(2.5)] == 1
    assert d.counts["draining"][d.buckets.index(60.0)] == 1
    assert m.begin("decode", 0, now=90.0)
    m.stop(now=91.0)  # a switch cut short by a stop: its phase is timed, the switch as a whole is not
    assert d.count("fenced") == 3 and d.count("total") == 1 and d.count("total_rolled_back") == 1
