"""Async access to cluster state in Redis: worker registry and heartbeats, roles and their event
stream, the prefix index, per-API-key rate limits and the planner's leader lease.

Values are plain strings, ints and JSON; nothing is pickled. Keys come from `keys.Keys` only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from cluster.state.keys import Keys, key_digest

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "mixed"]
ROLES: tuple[str, ...] = ("prefill", "decode", "mixed")
EVENTS_MAXLEN = 1000
RATE_WINDOW_S = 60

# Only refresh a worker that still exists: a plain HSET would resurrect an expired worker as a
# partial hash (load but no address), which readers could not use.
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[3], 'heartbeat_ts', ARGV[4], 'ready', ARGV[5], 'phase', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# An older epoch than the stored one is a stale write (reordered or from a restarted caller):
# refuse it so a worker's role never goes backwards.
_SET_ROLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0
if tonumber(ARGV[2]) < cur then return -1 end
local prev = redis.call('HGET', KEYS[1], 'role') or ''
redis.call('HSET', KEYS[1], 'role', ARGV[1], 'epoch', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'role', 'worker_id', ARGV[3],
           'role', ARGV[1], 'prev_role', prev, 'epoch', ARGV[2], 'ts', ARGV[4])
return 1
"""

# Remove ids whose hash is gone, re-checking on the server: the worker may have re-registered
# between our read and this cleanup, and must then stay in the set.
_PRUNE = """
local n = 0
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then n = n + redis.call('SREM', KEYS[1], id) end
end
return n
"""

# Take the lease if free, or extend it if we already hold it.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as of its last heartbeat."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    queued_prefill_tokens: int = 0
    prefix_cache_hits: int = 0
    num_holding_kv: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerLoad:
        data = json.loads(text) if text else {}
        # Ignore unknown fields: a newer worker may report more than this reader knows.
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's registration as stored in its Redis hash."""

    worker_id: str
    address: str
    role: Role
    epoch: int
    model: str
    layout_hash: str
    transport: str
    load: WorkerLoad = field(default_factory=WorkerLoad)
    heartbeat_ts: float = 0.0
    ready: bool = True
    started_ts: float = 0.0
    expert_parallel_size: int = 1
    phase: str = "ready"  # the worker's admission phase (cluster.worker.roles)
    block_size: int = 0  # KV block size (the prefix index's unit); 0 = not published
    max_model_len: int = 0  # 0 = not published

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")

    def to_hash(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "address": self.address,
            "role": self.role,
            "epoch": str(int(self.epoch)),
            "model": self.model,
            "layout_hash": self.layout_hash,
            "transport": self.transport,
            "load": self.load.to_json(),
            "heartbeat_ts": repr(float(self.heartbeat_ts)),
            "ready": "1" if self.ready else "0",
            "started_ts": repr(float(self.started_ts)),
            "expert_parallel_size": str(int(self.expert_parallel_size)),
            "phase": self.phase,
            "block_size": str(int(self.block_size)),
            "max_model_len": str(int(self.max_model_len)),
        }

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> WorkerInfo:
        return cls(
            worker_id=h["worker_id"],
            address=h["address"],
            role=h["role"],  # type: ignore[arg-type]  # validated in __post_init__
            epoch=int(h["epoch"]),
            model=h.get("model", ""),
            layout_hash=h.get("layout_hash", ""),
            transport=h.get("transport", ""),
            load=WorkerLoad.from_json(h.get("load", "")),
            heartbeat_ts=float(h.get("heartbeat_ts", 0.0)),
            ready=h.get("ready", "0") == "1",
            started_ts=float(h.get("started_ts", 0.0)),
            expert_parallel_size=int(h.get("expert_parallel_size", 1)),
            phase=h.get("phase", "ready"),
            block_size=int(h.get("block_size", 0)),
            max_model_len=int(h.get("max_model_len", 0)),
        )


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"a TTL must be positive, got {seconds}")
    return max(1, int(seconds * 1000))


class Store:
    """Cluster state of one cluster name in one Redis. Safe to share within one event loop."""

    def __init__(self, redis: aioredis.Redis, cluster: str = "default") -> None:
        # Readers expect str values: the client must decode responses.
        if not redis.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Store needs a redis client made with decode_responses=True")
        self.redis = redis
        self.keys = Keys(cluster)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._set_role = redis.register_script(_SET_ROLE)
        self._prune = redis.register_script(_PRUNE)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, cluster: str = "default", **redis_kwargs: Any) -> Store:
        """`redis://host:port/db`, `rediss://...` or `unix:///path.sock`; connects lazily."""
        redis_kwargs["decode_responses"] = True
        # Fail instead of hanging forever when Redis is unreachable.
        redis_kwargs.setdefault("socket_connect_timeout", 5.0)
        redis_kwargs.setdefault("socket_timeout", 10.0)
        # A client made from a URL does not retry at all; reconnect across a Redis restart or a
        # dropped connection (retried commands are idempotent, except INCR: a rate limit may
        # then count one request twice).
        redis_kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3))
        return cls(aioredis.Redis.from_url(url, **redis_kwargs), cluster)

    @property
    def cluster(self) -> str:
        return self.keys.cluster

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        """Close the underlying client (also one passed to the constructor)."""
        await self.redis.aclose()

    # ----- registry -----
    async def register_worker(self, info: WorkerInfo, ttl_s: float = 10.0) -> None:
        """(Re)write the worker's whole hash with a TTL and add it to the worker set."""
        key = self.keys.worker(info.worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            # DEL first so fields of an earlier registration never linger.
            pipe.delete(key)
            pipe.hset(key, mapping=info.to_hash())
            pipe.pexpire(key, _ms(ttl_s))
            pipe.sadd(self.keys.workers(), info.worker_id)
            await pipe.execute()
        logger.info("registered worker %s (%s, epoch %d) at %s", info.worker_id, info.role, info.epoch, info.address)

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ready: bool = True, ttl_s: float = 10.0,
                        phase: str = "ready") -> bool:
        """Refresh load, readiness, phase and TTL. False when the worker's hash is gone: the worker
        must re-register."""
        ok = await self._heartbeat(
            keys=[self.keys.worker(worker_id), self.keys.workers()],
            args=[_ms(ttl_s), worker_id, load.to_json(), repr(time.time()), "1" if ready else "0", phase],
        )
        if not ok:
            logger.warning("heartbeat of worker %s found no registration (expired or removed)", worker_id)
        return bool(ok)

    async def set_role(self, worker_id: str, role: Role, epoch: int) -> bool:
        """Record a role change and append it to the events stream.

        False (and no event) when the worker is not registered or `epoch` is older than the
        stored one; an equal epoch is accepted so a retried call is harmless.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        res = await self._set_role(
            keys=[self.keys.worker(worker_id), self.keys.events()],
            args=[role, int(epoch), worker_id, repr(time.time()), EVENTS_MAXLEN],
        )
        if res == 1:
            logger.info("worker %s is now %s (epoch %d)", worker_id, role, epoch)
        elif res == -1:
            logger.warning("stale role change of worker %s to %s at epoch %d refused", worker_id, role, epoch)
        else:
            logger.warning("role change of unknown worker %s refused", worker_id)
        return res == 1

    async def deregister(self, worker_id: str) -> None:
        """Remove the worker now. Its prefix index entries are left to expire."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.srem(self.keys.workers(), worker_id)
            await pipe.execute()
        logger.info("deregistered worker %s", worker_id)

    async def get_worker(self, worker_id: str) -> WorkerInfo | None:
        h = await self.redis.hgetall(self.keys.worker(worker_id))
        return self._decode(worker_id, h) if h else None

    async def list_workers(self) -> list[WorkerInfo]:
        """Live workers sorted by id; ids whose hash expired are dropped from the set."""
        ids = sorted(await self.redis.smembers(self.keys.workers()))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self.keys.worker(wid))
            rows = await pipe.execute()
        out: list[WorkerInfo] = []
        gone: list[str] = []
        for wid, h in zip(ids, rows):
            if not h:
                gone.append(wid)
                continue
            info = self._decode(wid, h)
            if info is not None:
                out.append(info)
        if gone:
            removed = await self._prune(keys=[self.keys.workers(), *map(self.keys.worker, gone)], args=gone)
            if removed:
                logger.info("dropped %d expired worker(s) from the registry: %s", removed, ", ".join(gone))
        return out

    @staticmethod
    def _decode(worker_id: str, h: dict[str, str]) -> WorkerInfo | None:
        # One malformed entry (a half-written or foreign hash) must not blind every reader.
        try:
            return WorkerInfo.from_hash(h)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("skipping malformed registration of worker %s: %r", worker_id, exc)
            return None

    # ----- events -----
    async def read_events(self, after: str = "0-0", count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """Events with stream ids after `after` (oldest first); pass the last id seen to continue."""
        return await self.redis.xrange(self.keys.events(), min=f"({after}", max="+", count=count)

    # ----- prefix index -----
    async def publish_prefix(self, worker_id: str, block_hashes: Sequence[int], ttl_s: float = 600) -> None:
        """Mark the blocks as cached on `worker_id` (a hint: entries live `ttl_s` after the last publish)."""
        if not block_hashes:
            return
        ttl = _ms(ttl_s)
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in block_hashes:
                key = self.keys.prefix(h)
                pipe.sadd(key, worker_id)
                pipe.pexpire(key, ttl)
            await pipe.execute()

    async def forget_prefixes(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        if not block_hashes:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in block_hashes:
                pipe.srem(self.keys.prefix(h), worker_id)
            await pipe.execute()

    async def prefix_overlap(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, how many LEADING blocks of the chain it holds (workers with none are absent)."""
        if not block_hashes:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in block_hashes:
                pipe.smembers(self.keys.prefix(h))
            rows = await pipe.execute()
        overlap: dict[str, int] = {}
        # A block past a gap is useless to a worker: its cache lookup stops at the first miss.
        alive: set[str] = set(rows[0])
        for i, members in enumerate(rows):
            if i:
                alive &= members
            if not alive:
                break
            for wid in alive:
                overlap[wid] = i + 1
        return overlap

    # ----- rate limits -----
    async def rate_limit(self, api_key: str, limit_per_minute: int, now: float | None = None) -> tuple[bool, float]:
        """Count one request of `api_key` in its fixed 60 s window: (allowed, seconds until the next window).

        Only the key's digest reaches Redis or the log. retry_after is 0.0 when allowed.
        """
        if limit_per_minute <= 0:
            raise ValueError(f"limit_per_minute must be positive, got {limit_per_minute}")
        now = time.time() if now is None else now
        window = int(now // RATE_WINDOW_S)
        digest = key_digest(api_key)
        key = self.keys.ratelimit(digest, window)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            # Two windows long: the key outlives its window even with some clock skew between routers.
            pipe.expire(key, 2 * RATE_WINDOW_S)
            count, _ = await pipe.execute()
        if count <= limit_per_minute:
            return True, 0.0
        retry_after = max((window + 1) * RATE_WINDOW_S - now, 0.001)
        logger.debug("rate limit hit for key %s: %d > %d per minute", digest, count, limit_per_minute)
        return False, retry_after

    # ----- planner leader lease -----
    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take the planner lease, or extend it if `holder` already has it. Renew well before ttl_s."""
        return bool(await self._acquire(keys=[self.keys.planner()], args=[holder, _ms(ttl_s)]))

    async def release_lease(self, holder: str) -> bool:
        """Give the lease up if `holder` has it."""
        return bool(await self._release(keys=[self.keys.planner()], args=[holder]))

    async def lease_holder(self) -> str | None:
        return await self.redis.get(self.keys.planner())
