"""What `pdserve launch` places, pure: ClusterConfig -> the Redis, worker and router slots, each
with what it starts from, its Ray options and the digest that names it (cluster/deploy/reconcile.py)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cluster.config import ClusterConfig, WorkerSpec
from cluster.deploy.reconcile import Slot, digest

# A worker under `pdserve launch` binds every interface unless told otherwise, and registers the
# node's IP (cluster/worker/address.py): routers and other workers on other nodes must reach it.
LAUNCH_WORKER_HOST = "0.0.0.0"

# Fields a router does not depend on: changing them must not restart the routers.
_NOT_ROUTER = {"prefill", "decode", "mixed", "workers", "placement", "worker_host", "worker_port", "advertise_host",
               "worker_threads", "cpu_bind", "kv_transport", "kv_failure_policy", "kv_lease_seconds", "migrate_kv",
               "drain_timeout_seconds"}


@dataclass(frozen=True)
class WorkerSlot:
    slot: Slot
    spec: WorkerSpec
    options: dict[str, Any]  # Ray actor options of rank 0 (resources, label selector)
    ep_strategy: str


@dataclass(frozen=True)
class RouterSlot:
    slot: Slot
    config: dict[str, Any] = field(repr=False)  # the router's ClusterConfig, JSON-able (holds keys)
    port: int = 0
    options: dict[str, Any] = field(default_factory=dict)


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def redis_placement(url: str) -> dict[str, Any]:
    """Ray options that put the Redis on the node `url` names: a node IP's `node:<ip>` resource,
    or the head for a loopback host. ValueError for other hosts (a DNS name could be anywhere)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.port:
        raise ValueError(f"launch.start_redis needs a redis://host:port URL (scheme {parts.scheme!r}, "
                         f"port {parts.port})")
    host = parts.hostname or ""
    if host in LOOPBACK:
        return {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"launch.start_redis needs redis_url's host to be a node's IP or loopback, "
                         f"not {host!r}") from None
    return {"num_cpus": 0, "resources": {f"node:{host}": 0.001}}


@dataclass(frozen=True)
class RedisSlot:
    slot: Slot
    url: str = field(repr=False)  # may hold a password
    options: dict[str, Any] = field(default_factory=dict)


def redis_slots(config: ClusterConfig, redis_url: str, running: bool, reachable: bool) -> list[RedisSlot]:
    """The Redis launch runs (`launch.start_redis`): kept while our actor runs, started when
    nothing answers at the URL, none when another Redis answers there (launch joins it)."""
    if not config.launch.start_redis or (reachable and not running):
        return []
    options = redis_placement(redis_url)
    return [RedisSlot(Slot("redis", digest({"url": redis_url, "options": options})), redis_url, options)]


def worker_slots(config: ClusterConfig, redis_url: str) -> list[WorkerSlot]:
    """One slot per worker, named `<role>-<i>` in the config's start order; the worker's registry
    id is its slot name, so a replaced worker takes its predecessor's place."""
    host = config.worker_host or LAUNCH_WORKER_HOST
    counts: dict[str, int] = {}
    out = []
    for spec in config.worker_specs(redis_url, host=host):
        i = counts.get(spec.role, 0)
        counts[spec.role] = i + 1
        name = f"{spec.role}-{i}"
        spec = spec.model_copy(update={"worker_id": name})
        options = config.placement.pool(spec.role).ray_options(default_cpus=spec.num_threads)
        payload = {"spec": spec.model_dump(mode="json"), "options": options,
                   "ep_strategy": config.placement.ep_strategy}
        out.append(WorkerSlot(Slot(name, digest(payload)), spec, options, config.placement.ep_strategy))
    return out


def router_slots(config: ClusterConfig, redis_url: str) -> list[RouterSlot]:
    """`launch.routers` router actors; router i listens on `port + i` (0: a free port each)."""
    if not config.launch.routers:
        return []
    data = config.model_dump(mode="json", exclude=_NOT_ROUTER)
    data["redis_url"] = redis_url
    data.pop("launch", None)
    placement = config.launch.router_placement
    options = placement.ray_options(default_cpus=config.launch.router_num_cpus)
    out = []
    for i in range(config.launch.routers):
        port = config.port + i if config.port else 0
        payload = {"config": data, "port": port, "options": options}
        out.append(RouterSlot(Slot(f"router-{i}", digest(payload)), data, port, options))
    return out
