"""Builders for cluster tests: Ray started by the test, real Redis, workers as Ray actors, the
router over real HTTP. One Ray session serves every cluster of a test run; clusters are kept
apart by their Redis cluster name."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Sequence
from contextlib import contextmanager

from cluster.config import ClusterConfig, EngineArgs
from cluster.worker.runtime import pid_alive

# Small KV pools keep each worker's memory low; 256 blocks of 16 tokens is plenty for the tests.
TEST_ENGINE = EngineArgs(num_kv_blocks=256, max_model_len=2048, max_num_seqs=64)


@contextmanager
def ray_session(num_cpus: int = 8, num_gpus: int = 0):
    import ray

    tmp = tempfile.mkdtemp(prefix="pdt-", dir="/tmp")
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=tmp,
                     logging_level=logging.WARNING, log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            # On a loaded 2-core host a fresh raylet can miss Ray's startup deadline (seen once in a
            # full suite run, right after another module's session ended): start again, once.
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix="pdt-", dir="/tmp")
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def cluster_config(name: str, **fields) -> ClusterConfig:
    fields.setdefault("engine", TEST_ENGINE)
    fields.setdefault("port", 0)
    return ClusterConfig(cluster=name, **fields)


@contextmanager
def running_cluster(config: ClusterConfig, redis_url: str):
    """Workers + router of `config` on the already running Ray; yields the ServeSession (with .url)."""
    from cluster.launch import ServeSession

    data = config.model_dump()
    data["redis_url"] = redis_url
    session = ServeSession(ClusterConfig.model_validate(data))
    try:
        session.start_state()
        session.start_workers()
        session.url = session.start_router(port=0)
        wait_ready(session.url)
        yield session
    finally:
        session.stop()


@contextmanager
def running_clusters(configs: Sequence[ClusterConfig], redis_url: str):
    """Several `running_cluster`s brought up at once (start-up is mostly process spawns and imports,
    which overlap); yields their sessions in order."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer  # noqa: F401 - its lazy import is not thread-safe

    managers = [running_cluster(c, redis_url) for c in configs]
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
    entered = [m for m, f in zip(managers, futures) if f.exception() is None]
    try:
        yield [f.result() for f in futures]  # raises the first start-up error
    finally:
        for m in reversed(entered):
            m.__exit__(None, None, None)


def wait_ready(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/ready", timeout=5)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"router at {url} not ready: {getattr(last, 'text', last)}")


def worker_leaks(session, timeout: float = 10.0, skip: Collection[str] = ()) -> list[str]:
    """Poll every worker's leak check until clean or timeout (aborts and releases are asynchronous).
    Workers named in `skip` (e.g. one whose engine was made to fail) are left out."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        problems = []
        for w, actor in zip(session.workers, session.actors):
            if w["worker_id"] in skip:
                continue
            problems += [f"{w['worker_id']}: {p}" for p in ray.get(actor.leaks.remote(), timeout=30)]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


def worker_stats(session) -> dict[str, object]:
    import ray

    from pdserve.v1 import worker_pb2

    out = {}
    for w, actor in zip(session.workers, session.actors):
        out[w["role"] + ":" + w["worker_id"]] = worker_pb2.StatsResponse.FromString(ray.get(actor.stats.remote()))
    return out


def stream_then_disconnect(base_url: str, body: dict, api_key: str, events: int = 3) -> None:
    """POST a streaming completion, read a few SSE events, then drop the connection (a client going away)."""
    import httpx

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {api_key}"}) as resp:
            assert resp.status_code == 200, resp.read()
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data: ")
                if seen >= events:
                    return


def ep_rank_pids(session) -> dict[str, list[int]]:
    """Pids of the expert-parallel ranks 1..N-1 of each worker, by worker id ([] for EP=1)."""
    import ray

    return {w["worker_id"]: ray.get(a.ep_pids.remote(), timeout=30) for w, a in zip(session.workers, session.actors)}


def pids_still_running(pids: Iterable[int], timeout: float = 15.0) -> list[int]:
    """Wait up to `timeout` for every pid to end; returns those still running (leaked processes)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def admin_request(session, key: str, method: str, path: str, **kw):
    """One call to the router's admin API with admin key `key`."""
    import httpx

    return httpx.request(method, f"{session.url}/admin{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=30, **kw)


def switch_role(session, key: str, wid: str, role: str, migrate: bool = False, timeout: float = 120.0) -> dict:
    """Switch worker `wid` to `role` through the admin API and wait until it is ready again with
    that role at the next epoch (asserted); returns the worker's admin object."""
    epoch = admin_request(session, key, "GET", f"/workers/{wid}").json()["epoch"]
    resp = admin_request(session, key, "POST", f"/workers/{wid}/role",
                         json={"role": role, "expected_epoch": epoch, "migrate": migrate})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + timeout
    while True:
        w = admin_request(session, key, "GET", f"/workers/{wid}").json()
        if w["phase"] in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (w["phase"], w["role"], w["epoch"]) == ("ready", role, epoch + 1), w
    return w
