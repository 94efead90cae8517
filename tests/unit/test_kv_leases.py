"""LeaseTable: pure lease bookkeeping with injected time."""
from __future__ import annotations

import math

import pytest

from cluster.kv.counters import KVCounters
from cluster.kv.leases import Lease, LeaseTable


def test_add_get_extend_release():
    t = LeaseTable(lease_seconds=10.0)
    assert t.add("a", [3, 4, 5], 40, now=100.0) == 110.0
    assert t.get("a") == Lease("a", (3, 4, 5), 40, 110.0)
    assert len(t) == 1 and "a" in t
    assert t.extend("a", now=105.0) == 115.0
    assert t.get("a").expiry == 115.0
    assert t.release("a") is True
    assert t.release("a") is False  # exactly once
    assert t.get("a") is None and len(t) == 0
    assert t.extend("a", now=106.0) is None


def test_extend_never_shortens_and_refuses_past_expiry():
    t = LeaseTable(lease_seconds=10.0)
    t.add("a", [1], 1, now=0.0)
    assert t.extend("a", now=-5.0) == 10.0  # a clock step backwards does not shorten the lease
    assert t.extend("a", now=10.0) is None  # at/after expiry the lease is dead, even before reaping
    assert "a" in t  # ...but only the reaper removes it (and unpins the blocks)


def test_pop_expired_counts_and_removes():
    t = LeaseTable(lease_seconds=5.0)
    t.add("a", [1], 16, now=0.0)
    t.add("b", [2], 16, now=3.0)
    t.add("c", [4], 16, now=10.0)
    assert t.pop_expired(now=4.9) == []
    assert sorted(t.pop_expired(now=8.0)) == ["a", "b"]
    assert t.expired_total == 2 and len(t) == 1
    assert t.release("a") is False  # already expired: Release reports it
    assert t.pop_expired(now=8.0) == []
    assert t.pop_expired(now=15.0) == ["c"]
    assert t.expired_total == 3 and len(t) == 0


def test_unknown_ids():
    t = LeaseTable()
    assert t.lease_seconds == 30.0
    assert t.get("x") is None
    assert t.extend("x", now=1.0) is None
    assert t.release("x") is False


@pytest.mark.parametrize("seconds", [0, -1.0, math.inf, math.nan, "30"])
def test_bad_lease_seconds(seconds):
    with pytest.raises(ValueError):
        LeaseTable(lease_seconds=seconds)


@pytest.mark.parametrize(
    "rid, blocks, tokens, now",
    [("", [1], 1, 0.0), ("a", [], 1, 0.0), ("a", [-1], 1, 0.0), ("a", [2, 2], 1, 0.0), ("a", [1], 0, 0.0),
     ("a", [1], 1, math.nan), ("a", [1], 1, math.inf)],
)
def test_bad_add(rid, blocks, tokens, now):
    t = LeaseTable()
    with pytest.raises(ValueError):
        t.add(rid, blocks, tokens, now)
    assert len(t) == 0


def test_duplicate_and_bad_times():
    t = LeaseTable()
    t.add("a", [1], 1, now=0.0)
    with pytest.raises(ValueError, match="already holds"):
        t.add("a", [2], 1, now=0.0)
    with pytest.raises(ValueError):
        t.extend("a", now=math.nan)
    with pytest.raises(ValueError):
        t.pop_expired(now=math.inf)


def test_counters_start_at_zero():
    c = KVCounters()
    assert set(c.as_dict().values()) == {0}
    c.transfers_total += 1
    assert c.as_dict()["transfers_total"] == 1
