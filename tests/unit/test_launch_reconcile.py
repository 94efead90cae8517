"""The launcher's pure parts: reconcile (observed actor names + desired slots -> plan) and the
layout (ClusterConfig -> named worker/router slots with Ray options)."""
from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.deploy.layout import router_slots, worker_slots
from cluster.deploy.reconcile import Slot, digest, parse_actor_name, plan


def _slots(*pairs: str) -> list[Slot]:
    return [Slot(*p.split("@")) for p in pairs]


def test_same_config_keeps_everything():
    desired = _slots("prefill-0@a1", "decode-0@b2")
    p = plan(["decode-0@b2", "prefill-0@a1"], desired)
    assert p.keep == ("prefill-0@a1", "decode-0@b2") and not p.stop and not p.create and not p.changes


def test_nothing_running_creates_every_slot_in_order():
    desired = _slots("prefill-0@a", "prefill-1@b", "decode-0@c")
    p = plan([], desired)
    assert p.create == tuple(desired) and not p.keep and not p.stop


def test_more_workers_adds_only_the_new_slots():
    p = plan(["prefill-0@a", "decode-0@c"], _slots("prefill-0@a", "decode-0@c", "decode-1@d"))
    assert [s.name for s in p.create] == ["decode-1"] and not p.stop


def test_fewer_workers_stops_the_surplus():
    p = plan(["prefill-0@a", "decode-0@c", "decode-1@d"], _slots("prefill-0@a", "decode-0@c"))
    assert p.stop == ("decode-1@d",) and not p.create


def test_a_changed_spec_replaces_the_slot():
    p = plan(["prefill-0@old", "decode-0@c"], _slots("prefill-0@new", "decode-0@c"))
    assert p.stop == ("prefill-0@old",) and [s.actor_name for s in p.create] == ["prefill-0@new"]
    assert p.keep == ("decode-0@c",)


def test_duplicates_of_a_slot_keep_one_match():
    p = plan(["prefill-0@x", "prefill-0@a"], _slots("prefill-0@a"))
    assert p.keep == ("prefill-0@a",) and p.stop == ("prefill-0@x",) and not p.create


def test_foreign_names_are_left_alone():
    p = plan(["someone-elses-actor", "@x", "y@"], _slots("mixed-0@m"))
    assert set(p.foreign) == {"someone-elses-actor", "@x", "y@"} and not p.stop
    assert p.summary() == "kept 0, stopping 0, starting 1"


def test_slot_names_are_checked():
    assert parse_actor_name("decode-3@abc") == Slot("decode-3", "abc")
    assert parse_actor_name("plain") is None
    with pytest.raises(ValueError):
        Slot("a@b", "c")
    with pytest.raises(ValueError):
        plan([], _slots("a@1", "a@2"))


def test_digest_ignores_key_order():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1}) != digest({"a": 2, "b": [1, 2]})


# ----- layout -----
def test_worker_slots_name_roles_bind_wildcard_and_carry_placement():
    config = ClusterConfig(prefill=2, decode=1, placement={"prefill": {"resources": {"prefill_pool": 1}},
                                                           "decode": {"num_cpus": 2, "node_labels": {"pool": "d"}}})
    slots = worker_slots(config, "redis://r:6379/0")
    assert [s.slot.name for s in slots] == ["prefill-0", "prefill-1", "decode-0"]
    assert [s.spec.worker_id for s in slots] == ["prefill-0", "prefill-1", "decode-0"]
    assert {s.spec.host for s in slots} == {"0.0.0.0"}
    assert slots[0].options == {"num_cpus": 1, "resources": {"prefill_pool": 1}}
    assert slots[2].options == {"num_cpus": 2, "label_selector": {"pool": "d"}}
    assert len({s.slot.digest for s in slots}) == 3  # worker ids differ


def test_worker_digests_follow_the_spec_not_the_count():
    a = {s.slot.name: s.slot.digest for s in worker_slots(ClusterConfig(prefill=1, decode=1), "redis://r")}
    b = {s.slot.name: s.slot.digest for s in worker_slots(ClusterConfig(prefill=1, decode=2), "redis://r")}
    assert a["prefill-0"] == b["prefill-0"] and a["decode-0"] == b["decode-0"] and "decode-1" in b
    c = {s.slot.name: s.slot.digest for s in worker_slots(
        ClusterConfig(prefill=1, decode=1, engine={"max_num_seqs": 8}), "redis://r")}
    assert c["prefill-0"] != a["prefill-0"]
    d = {s.slot.name: s.slot.digest for s in worker_slots(
        ClusterConfig(prefill=1, decode=1, placement={"decode": {"num_gpus": 1}}), "redis://r")}
    assert d["prefill-0"] == a["prefill-0"] and d["decode-0"] != a["decode-0"]


def test_expert_parallel_groups_and_explicit_hosts():
    config = ClusterConfig(workers=[{"role": "mixed", "count": 1, "expert_parallel_size": 2}],
                           worker_host="10.0.0.2", advertise_host="node-2")
    (slot,) = worker_slots(config, "redis://r")
    assert slot.spec.engine.expert_parallel_size == 2 and slot.ep_strategy == "STRICT_PACK"
    assert (slot.spec.host, slot.spec.advertise_host) == ("10.0.0.2", "node-2")


def test_router_slots_ports_and_what_restarts_them():
    config = ClusterConfig(port=8100, launch={"routers": 2, "router_num_cpus": 0.5}, api_keys=("k",))
    r = router_slots(config, "redis://r")
    assert [(s.slot.name, s.port, s.options) for s in r] == [("router-0", 8100, {"num_cpus": 0.5}),
                                                              ("router-1", 8101, {"num_cpus": 0.5})]
    assert "k" not in repr(r)  # keys never in a repr (logs)
    assert ClusterConfig.model_validate(r[0].config).api_keys == ("k",)
    more_workers = router_slots(config.model_copy(update={"decode": 3}), "redis://r")
    assert [s.slot for s in more_workers] == [s.slot for s in r]
    assert router_slots(ClusterConfig(), "redis://r") == []


def test_redis_slot_only_when_asked_and_nothing_else_answers():
    from cluster.deploy.layout import redis_slots

    url = "redis://:pw@127.0.0.1:6390/0"
    on = ClusterConfig(redis_url=url, launch={"start_redis": True})
    assert redis_slots(ClusterConfig(redis_url=url), url, running=False, reachable=False) == []
    assert redis_slots(on, url, running=False, reachable=True) == []  # another Redis answers: join it
    (slot,) = redis_slots(on, url, running=False, reachable=False)
    assert slot.slot.name == "redis" and slot.options == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    assert redis_slots(on, url, running=True, reachable=True)[0].slot == slot.slot  # ours answers: keep it
    assert "pw" not in repr(slot) and "pw" not in slot.slot.actor_name


def test_redis_placement_follows_the_url_host():
    from cluster.deploy.layout import redis_placement

    assert redis_placement("redis://10.0.0.9:6379/0")["resources"] == {"node:10.0.0.9": 0.001}
    for bad in ("redis://redis.internal:6379/0", "unix:///tmp/r.sock", "redis://127.0.0.1/0"):
        with pytest.raises(ValueError):
            redis_placement(bad)


# ----- lead (which launch owns the actors) -----
def test_lead_goes_to_the_last_launch_that_changes_something():
    from cluster.deploy.lead import LaunchRecord, superseded, takes_lead

    live = LaunchRecord("old", "d1", ts=100.0)
    assert takes_lead(None, "me", "d1", once=False, now=101, ttl_s=10)
    assert takes_lead(live, "me", "d2", once=True, now=101, ttl_s=10)  # a changed config takes over
    assert takes_lead(live, "me", "d1", once=False, now=101, ttl_s=10)  # a resubmitted lasting job too
    assert not takes_lead(live, "me", "d1", once=True, now=101, ttl_s=10)  # --once of the same config does not
    assert takes_lead(live, "me", "d1", once=True, now=111, ttl_s=10)  # the old leader's driver is gone
    assert takes_lead(live, "old", "d2", once=False, now=101, ttl_s=10)
    assert not superseded(live, "old") and superseded(live, "me") and superseded(None, "old")


def test_lead_record_round_trips_and_tolerates_junk():
    from cluster.deploy.lead import LaunchRecord

    r = LaunchRecord("a1", "d", 12.5)
    assert LaunchRecord.from_hash(r.to_hash()) == r
    assert LaunchRecord.from_hash({}) is None and LaunchRecord.from_hash({"owner": "x", "ts": "soon"}) is None
