"""Two router apps of one cluster (cluster/router/standalone.py, as two `pdserve router`
processes build them) over a real Redis: one rate limit per API key across both, one planner
leader between them, and the other taking the lead when the leader goes away."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from cluster.config import ClusterConfig
from cluster.router.standalone import build_standalone_app


def _config(redis_url: str) -> ClusterConfig:
    return ClusterConfig(cluster="replicas", redis_url=redis_url, api_keys=("user",), admin_api_keys=("admin",),
                         rate_limit_per_minute=2, planner={"enabled": True, "interval_s": 0.2, "lease_ttl_s": 1.0})


def _wait(check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _complete(client: TestClient) -> int:
    return client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                       headers={"Authorization": "Bearer user"}).status_code


def _leader(client: TestClient) -> bool:
    return client.get("/admin/planner", headers={"Authorization": "Bearer admin"}).json()["leader"]


def test_two_routers_share_limits_and_elect_one_planner(redis_url):
    try:
        app_a, app_b = build_standalone_app(_config(redis_url)), build_standalone_app(_config(redis_url))
    except FileNotFoundError as exc:
        pytest.skip(f"the default model's folder is needed: {exc}")
    a, b = TestClient(app_a).__enter__(), TestClient(app_b).__enter__()  # lifespans (planners) up
    running = [a, b]
    try:
        # No worker is registered: an admitted request is a 503, a refused one a 429. The window
        # is per wall-clock minute: start early in one so that all four land in it.
        if time.time() % 60 > 50:
            time.sleep(60 - time.time() % 60 + 0.1)
        assert [_complete(a), _complete(b), _complete(a), _complete(b)] == [503, 503, 429, 429]
        _wait(lambda: _leader(a) or _leader(b))
        time.sleep(0.5)  # a few planner intervals: still exactly one leader
        assert _leader(a) != _leader(b)
        leader, other = (a, b) if _leader(a) else (b, a)
        running.remove(leader)
        leader.__exit__(None, None, None)  # the leading router stops (its lease is released)
        _wait(lambda: _leader(other))
    finally:
        for client in running:
            client.__exit__(None, None, None)
