"""The router as a process of its own: `pdserve router --redis-url URL` (a Kubernetes Deployment,
or a Ray actor started by `pdserve launch`).

It discovers workers through the Redis registry and keeps no state of its own that another router
needs: rate-limit windows live in Redis, worker roles and epochs are read from the registry, and
the planner (when on) runs in whichever router holds the Redis leader lease. So any number of
routers serve one cluster, and any of them may die while the others serve.

This import path loads neither torch nor the engine: the model's tokenizer, chat template and
context length come from its HF folder (cluster/router/model.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from cluster.config import ClusterConfig
from cluster.router.backend import ModelInfo

logger = logging.getLogger(__name__)


def build_app(config: ClusterConfig, redis_url: str, info: ModelInfo):
    """The FastAPI app over a ClusterBackend for `info`'s model, with the shared (Redis) rate
    limiter and, when `config.planner.enabled`, the planner."""
    from cluster.metrics import RouterMetrics
    from cluster.router.admin import add_planner_route
    from cluster.router.app import create_app
    from cluster.router.cluster_backend import ClusterBackend
    from cluster.router.settings import RouterSettings
    from cluster.state.store import Store

    backend = ClusterBackend(Store.from_url(redis_url, config.cluster), info, block_size=config.engine.block_size)
    settings = RouterSettings(api_keys=list(config.api_keys), admin_api_keys=list(config.admin_api_keys),
                              rate_limit_per_minute=config.rate_limit_per_minute,
                              reasoning_parser=config.reasoning_parser, served_model_name=info.name,
                              media=config.multimodal)
    limiter = None
    if config.rate_limit_per_minute:
        from cluster.router.limits import RedisRateLimiter

        # Shared across router replicas; the app's own in-memory limiter would count per replica.
        limiter = RedisRateLimiter(Store.from_url(redis_url, config.cluster), config.rate_limit_per_minute)
    metrics = RouterMetrics(latency_window_s=config.planner.latency_window_s)
    planner = None
    if config.planner.enabled:
        from cluster.planner.runner import PlannerRunner

        # The backend's store: the planner stops (and releases its lease) before the backend closes it.
        planner = PlannerRunner(backend.admin, backend.store, metrics, config.planner)
    app = create_app(backend, settings, rate_limiter=limiter, metrics=metrics,
                     services=[planner] if planner is not None else [])
    app.state.planner = planner
    if planner is not None and settings.admin_api_keys:
        add_planner_route(app, planner)
    return app


def build_standalone_app(config: ClusterConfig):
    """The app of a router process: the model read from its folder, torch-free."""
    from cluster.router.model import load_model_info

    if not config.redis_url:
        raise ValueError("a router process needs the cluster's Redis: --redis-url (or redis_url in --config)")
    info = load_model_info(config.engine.model, config.served_model_name, config.engine.max_model_len,
                           config.engine.mm_processor_kwargs)
    return build_app(config, config.redis_url, info)


class RouterServer:
    """uvicorn serving an app from a background thread: `start() -> base URL`, `stop()`."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.host = host
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> str:
        self._thread = threading.Thread(target=self._server.run, name="router", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the router did not start on {self.host}")
            time.sleep(0.05)
        return f"http://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout_s: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def run_router(config: ClusterConfig, stop: threading.Event) -> None:
    """Serve until `stop` is set (SIGTERM); prints the URL once the router accepts connections."""
    server = RouterServer(build_standalone_app(config), config.host, config.port)
    url = server.start()
    logger.info("router for cluster %r at %s (registry %s)", config.cluster, url, _redacted(config.redis_url or ""))
    print(f"pdserve: router at {url}/v1", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()


def _redacted(url: str) -> str:
    """A Redis URL without its password (never in logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
