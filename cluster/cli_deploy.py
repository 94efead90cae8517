"""``pdserve router`` and ``pdserve launch``: the processes a cluster operator places.

`router`: a router alone, outside Ray (torch-free), finding workers through Redis.
`launch`: the `ray job submit` entrypoint that places workers (and optionally routers) on an
existing Ray cluster and reconciles with what already runs there (cluster/deploy/).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

# The Redis URL may carry a password: an environment variable (from a Secret) keeps it off argv.
REDIS_URL_ENV = "PDSERVE_REDIS_URL"


def _keys(flag: list[str] | None, env: str) -> tuple[str, ...]:
    keys = list(flag or [])
    if not keys and os.environ.get(env):
        keys = [k.strip() for k in os.environ[env].split(",") if k.strip()]
    return tuple(keys)


def router_config(args: argparse.Namespace):
    """ClusterConfig of a router process: --config YAML (optional), flags over it."""
    from cluster.config import ClusterConfig

    data = ClusterConfig.from_yaml(args.config).model_dump() if args.config else {}
    engine = {k: v for k in ("model", "max_model_len", "block_size") if (v := getattr(args, k)) is not None}
    data["engine"] = {**data.get("engine", {}), **engine}
    fields = dict(redis_url=args.redis_url or os.environ.get(REDIS_URL_ENV), host=args.host, port=args.port,
                  cluster=args.cluster, served_model_name=args.served_model_name,
                  rate_limit_per_minute=args.rate_limit_per_minute, reasoning_parser=args.reasoning_parser)
    data.update({k: v for k, v in fields.items() if v is not None})
    if keys := _keys(args.api_key, "PDSERVE_API_KEY"):
        data["api_keys"] = keys
    if keys := _keys(args.admin_api_key, "PDSERVE_ADMIN_API_KEY"):
        data["admin_api_keys"] = keys
    planner = {k: v for k, v in (("enabled", True if args.planner else None), ("slo_ttft_ms", args.slo_ttft_ms),
                                 ("slo_itl_ms", args.slo_itl_ms)) if v is not None}
    if planner:
        data["planner"] = {**data.get("planner", {}), **planner}
    return ClusterConfig.model_validate(data)


def _cmd_router(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.router.standalone import run_router

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = router_config(args)
        if not config.redis_url:
            raise ValueError("--redis-url is required (the cluster's Redis, where workers register)")
    except (ValidationError, ValueError, OSError) as exc:
        print(f"pdserve router: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_router(config, stop)
    except KeyboardInterrupt:
        pass
    except (FileNotFoundError, ValueError) as exc:
        print(f"pdserve router: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.config import ClusterConfig
    from cluster.deploy.launcher import run_down, run_launch

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = {"redis_url": args.redis_url or os.environ.get(REDIS_URL_ENV), "ray_address": args.ray_address}
        config = ClusterConfig.from_yaml(args.config, **overrides)
        if not config.redis_url:
            raise ValueError("redis_url is required (a Redis every node and router reaches; "
                             "launch.start_redis starts one at that URL): set it in --config, "
                             "--redis-url or $PDSERVE_REDIS_URL")
    except (ValidationError, ValueError, OSError) as exc:
        print(f"pdserve launch: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.down:
        return run_down(config)
    return run_launch(config, stop, once=args.once)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `router` and `launch` to the `pdserve` command's sub-parsers."""
    r = sub.add_parser("router", help="a router alone (no Ray, no torch), finding workers through Redis")
    r.add_argument("--config", default=None, help="YAML with ClusterConfig fields (flags override it)")
    r.add_argument("--redis-url", default=None, help="the cluster's Redis (default: $PDSERVE_REDIS_URL, then "
                                                     "--config's redis_url; one of them is required)")
    r.add_argument("--cluster", default=None,
                   help="cluster name: the Redis key prefix the workers use (default 'default')")
    r.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    r.add_argument("--port", type=int, default=None, help="HTTP port (default 8000; 0 = pick a free one)")
    r.add_argument("--model", default=None, help="the workers' model: HF folder (default: the default model's "
                                                 "converted folder in the model cache)")
    r.add_argument("--served-model-name", default=None)
    r.add_argument("--max-model-len", type=int, default=None)
    r.add_argument("--block-size", type=int, default=None, help="the workers' KV block size (prefix index)")
    r.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; default: $PDSERVE_API_KEY, comma separated)")
    r.add_argument("--admin-api-key", action="append", default=None,
                   help="key of the /admin API (repeatable; default: $PDSERVE_ADMIN_API_KEY; none = off)")
    r.add_argument("--rate-limit-per-minute", type=int, default=None,
                   help="requests per minute per API key, shared by every router (counted in Redis)")
    r.add_argument("--reasoning-parser", choices=["think", "qwen3", "deepseek_r1", "ernie-45-vl", "ernie45"],
                   default=None)
    r.add_argument("--planner", action="store_true", help="run the planner here too (a Redis lease elects one)")
    r.add_argument("--slo-ttft-ms", type=float, default=None)
    r.add_argument("--slo-itl-ms", type=float, default=None)
    r.add_argument("--log-level", default="INFO")
    r.set_defaults(func=_cmd_router)

    la = sub.add_parser("launch", help="place the cluster on an existing Ray cluster (the `ray job submit` "
                                       "entrypoint); reconciles with what runs; blocks until stopped")
    la.add_argument("--config", required=True, help="YAML with ClusterConfig fields (`launch:` and `placement:`)")
    la.add_argument("--redis-url", default=None, help="override the config's redis_url (default: "
                                                      "$PDSERVE_REDIS_URL when set)")
    la.add_argument("--ray-address", default=None, help="override the config's ray_address (default: auto)")
    mode = la.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="reconcile, then exit leaving the workers running "
                                                          "(they are detached)")
    mode.add_argument("--down", action="store_true", help="stop every actor of the cluster (a running launch "
                                                          "steps down), then exit")
    la.add_argument("--log-level", default="INFO")
    la.set_defaults(func=_cmd_launch)
