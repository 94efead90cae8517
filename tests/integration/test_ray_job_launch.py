"""`ray job submit -- pdserve launch` onto a `ray start --head` cluster, with routers outside Ray.

Real tools throughout: a Ray head started by `ray start` on loopback (own temp dir, free ports,
token authentication on, custom resources standing for the prefill and decode node pools), the
job submitted and stopped with the `ray job` CLI, two `pdserve router` processes found by the
workers' Redis registry and driven by the official `openai` client. One router is killed while
the other keeps answering; a second launch of the same config reconciles (starts nothing); `ray
job stop` stops the workers; the head is stopped by its own PIDs (never `ray stop`, which would
end every Ray on the machine) and the test checks that nothing it started is left.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def _tree(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _mentioning(text: str) -> set[int]:
    """Processes whose command line mentions `text` (the head's temp dir)."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _terminate(pids: set[int], timeout_s: float = 20.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _alive(pids):
        os.kill(pid, signal.SIGKILL)
    _wait("killed processes to exit", lambda: not _alive(pids), 10)


class RayHead:
    """`ray start --head` on loopback; stopped by the PIDs it started."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pdrj-", dir="/tmp")  # short: Ray's socket paths
        self.dashboard_port = _free_port()
        self.gcs_port = _free_port()
        # Ray 2.60 turns token authentication on by default: set it on explicitly and pass the
        # token through the environment (never the shared ~/.ray/auth_token).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    # ray job stop: SIGTERM, then SIGKILL after this many seconds (default 3)
                    "RAY_JOB_STOP_WAIT_TIME_S": "30", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.pids: set[int] = set()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        ports = {"--port": self.gcs_port, "--dashboard-port": self.dashboard_port}
        for flag in ("--node-manager-port", "--object-manager-port", "--ray-client-server-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                     "--runtime-env-agent-port"):
            ports[flag] = _free_port()
        # Ray's worker ports are a range: keep the ports picked above out of it (an overlap, a few
        # percent of draws with a 200-port range, made `ray start` or a worker fail at random).
        low = _free_port()
        while any(low <= p <= low + 200 for p in (self.dashboard_port, self.gcs_port, *ports.values())):
            low = _free_port()
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
               "127.0.0.1", "--include-dashboard", "true", "--temp-dir", self.tmp, "--num-cpus", "6",
               "--resources", json.dumps({"pd_prefill_pool": 2, "pd_decode_pool": 2}), "--disable-usage-stats",
               "--min-worker-port", str(low), "--max-worker-port", str(low + 200)]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        self.pids = _tree(_mentioning(self.tmp))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    def ray(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout_s)
        if check:
            assert out.returncode == 0, f"ray {' '.join(args)}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
        return out

    def api(self, path: str) -> dict:
        """GET from the dashboard's HTTP API (job server, state API), as the CLI does underneath but
        without a ~2.5 s Python start per query; the token goes as a bearer header."""
        resp = httpx.get(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
                         timeout=30)
        resp.raise_for_status()
        return resp.json()

    def stop(self) -> None:
        pids = _tree(self.pids | _mentioning(self.tmp))
        _terminate(pids)
        self.pids = pids
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def router(config: Path, redis_url: str, key: str):
    """`pdserve router` with the launch's own config file (cluster name, engine limits), as the README
    advises; the Redis URL and the key come from the environment (secrets off the command line)."""
    port = _free_port()
    env = {**os.environ, "PDSERVE_API_KEY": key, "PDSERVE_REDIS_URL": redis_url}
    proc = subprocess.Popen([str(BIN / "pdserve"), "router", "--config", str(config),
                             "--port", str(port), "--log-level", "WARNING"], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        proc.stdout.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _chat(url: str, key: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, max_tokens=8,
                                          temperature=0)
    return resp.choices[0].message.content


def _worker_actors(head: RayHead, namespace: str) -> list[dict]:
    return _actors(head, namespace, "WorkerActor")


def _actors(head: RayHead, namespace: str, class_name: str) -> list[dict]:
    reply = head.api("/api/v0/actors?limit=1000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE")
    return [a for a in reply["data"]["result"]["result"] if a.get("ray_namespace") == namespace
            and a.get("class_name") == class_name]


def _job_status(head: RayHead, job: str) -> str:
    try:
        info = head.api(f"/api/jobs/{job}")
    except httpx.HTTPStatusError as exc:
        return f"no status: {exc}"
    return f"{info.get('status')}: {info.get('message')}"


def _job_logs(head: RayHead, job: str) -> str:
    try:
        return head.api(f"/api/jobs/{job}/logs").get("logs", "")
    except httpx.HTTPStatusError:
        return ""


def _logs_with(head: RayHead, job: str, text: str) -> str:
    """The job's logs once they contain `text`, else ""."""
    out = _job_logs(head, job)
    return out if text in out else ""


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _answers(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def test_ray_job_launch_routers_outside_and_reconcile(tmp_path):
    from engine.loader import resolve_model_path

    resolve_model_path(None)  # the default model's folder, converted once (the router reads it)
    cluster = f"rj{secrets.token_hex(3)}"
    key = secrets.token_hex(8)
    # Nothing answers there yet: the launch starts the cluster's Redis at this URL (start_redis).
    redis_url = f"redis://:{secrets.token_hex(8)}@127.0.0.1:{_free_port()}/0"
    config = {
        "cluster": cluster, "redis_url": redis_url, "prefill": 1, "decode": 1, "kv_transport": "grpc",
        "engine": {"num_kv_blocks": 256, "max_model_len": 2048, "max_num_seqs": 16},
        "placement": {"prefill": {"resources": {"pd_prefill_pool": 1}},
                      "decode": {"resources": {"pd_decode_pool": 1}}},
        "launch": {"reconcile_interval_s": 2, "stop_timeout_s": 5, "routers": 1, "router_num_cpus": 0.5,
                   "start_redis": True},
        "host": "127.0.0.1", "port": 0, "api_keys": [key],  # the router actor's; keys travel as actor args
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    namespace = f"pdserve-{cluster}"
    head = RayHead()
    job = f"pdserve-launch-{cluster}"
    started = time.monotonic()
    try:
        head.start()
        head.ray("job", "submit", "--address", head.address, "--submission-id", job, "--no-wait", "--",
                 str(BIN / "pdserve"), "launch", "--config", str(path))
        with router(path, redis_url, key) as (proc_a, url_a), router(path, redis_url, key) as (proc_b, url_b):
            def both_ready():
                status = _job_status(head, job)
                assert "FAILED" not in status, _job_logs(head, job)
                return _ready(url_a) and _ready(url_b)

            _wait("the launched workers, seen by both routers", both_ready, 600, every_s=2)
            ready_s = time.monotonic() - started
            # The job reports once its router actor is up too (after the workers).
            logs = _wait("the job to report", lambda: _logs_with(head, job, "workers ready"), 300, every_s=2)
            assert "2 workers ready" in logs and "(kept 0, stopping 0, starting 4)" in logs, logs
            assert "starting a Redis there" in logs and _answers(redis_url)
            assert key not in logs and redis_url.split("@")[0].split(":")[-1] not in logs  # no secrets in logs
            (url_actor,) = re.findall(r"router at (http://\S+)/v1", logs)
            # Workers bound 0.0.0.0 and registered the IP their Ray node registered (Ray picks the
            # host's interface address even for a loopback head), which routers dialled.
            (node,) = head.api("/api/v0/nodes")["data"]["result"]["result"]
            assert logs.count(f" at {node['node_ip']}:") == 2 and "0.0.0.0:" not in logs, (node, logs)

            models = httpx.get(f"{url_a}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
            assert models["data"][0]["max_model_len"] == 2048  # the workers' limit, from the shared config
            answer = _chat(url_a, key)
            assert answer and _chat(url_b, key) == answer  # greedy: the same workers, the same tokens
            assert _chat(url_actor, key) == answer  # the router the job started as a Ray actor
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url_a}/v1", api_key="wrong", max_retries=0).models.list()
            for proc in (proc_a, proc_b):  # routers outside Ray carry neither torch nor the engine
                assert not _maps_torch(proc.pid)

            actors = _worker_actors(head, namespace)
            assert len(actors) == 2, actors
            worker_pids = {a["pid"] for a in actors}

            proc_a.kill()  # one router dies; the other keeps serving the same cluster
            proc_a.wait(10)
            assert _chat(url_b, key) == answer

            # A second launch of the same config (as after a lost driver) adopts what runs.
            out = head.ray("job", "submit", "--address", head.address, "--", str(BIN / "pdserve"), "launch",
                           "--config", str(path), "--once", timeout_s=300)
            assert "(kept 4, stopping 0, starting 0)" in out.stdout, out.stdout[-3000:]
            again = _worker_actors(head, namespace)
            assert len(again) == 2 and {a["pid"] for a in again} == worker_pids
            assert _chat(url_b, key) == answer

            # A changed worker count applied by a one-off launch: it takes the lead and starts only
            # the new worker; the first job sees it was replaced and ends without stopping anything.
            config["decode"] = 2
            path2 = tmp_path / "cluster2.yaml"
            path2.write_text(yaml.safe_dump(config))
            out = head.ray("job", "submit", "--address", head.address, "--", str(BIN / "pdserve"), "launch",
                           "--config", str(path2), "--once", timeout_s=600)
            assert "3 workers ready (kept 4, stopping 0, starting 1)" in out.stdout, out.stdout[-3000:]
            _wait("the first job to step down", lambda: "succeeded" in _job_status(head, job).lower(), 60)
            assert "another launch has taken the lead" in _job_logs(head, job)
            grown = _worker_actors(head, namespace)
            assert len(grown) == 3 and worker_pids < {a["pid"] for a in grown}
            assert _chat(url_b, key) == answer

            # A lasting launch of the new config adopts all of it; `ray job stop` then ends it all.
            job = f"{job}-2"
            head.ray("job", "submit", "--address", head.address, "--submission-id", job, "--no-wait", "--",
                     str(BIN / "pdserve"), "launch", "--config", str(path2))
            logs = _wait("the second job to adopt the cluster", lambda: _logs_with(head, job, "workers ready"), 300,
                         every_s=2)
            assert "3 workers ready (kept 5, stopping 0, starting 0)" in logs, logs
            worker_pids = {a["pid"] for a in grown}

            head.ray("job", "stop", "--address", head.address, job, timeout_s=120)
            try:
                _wait("the job to stop", lambda: "stopped" in _job_status(head, job).lower(), 60)
            except AssertionError:
                raise AssertionError(_job_status(head, job) + _job_logs(head, job)[-4000:]) from None
            _wait("the workers' processes to exit", lambda: not _alive(worker_pids), 60)
            assert _worker_actors(head, namespace) == [] and _actors(head, namespace, "RouterActor") == []
            with pytest.raises(openai.APIConnectionError):
                _chat(url_actor, key)
            assert not _answers(redis_url)  # the Redis the job started stopped with it, last
            _wait("router b to see no worker", lambda: not _ready(url_b), 30)

            # Detached workers that outlive their launch (`--once`), then `--down` ends all of it.
            out = head.ray("job", "submit", "--address", head.address, "--", str(BIN / "pdserve"), "launch",
                           "--config", str(path), "--once", timeout_s=600)
            assert "2 workers ready (kept 0, stopping 0, starting 4)" in out.stdout, out.stdout[-3000:]
            _wait("router b to see the relaunched workers", lambda: _ready(url_b), 120, every_s=1)
            assert _chat(url_b, key) == answer
            relaunched = {a["pid"] for a in _worker_actors(head, namespace)}
            assert len(relaunched) == 2
            out = head.ray("job", "submit", "--address", head.address, "--", str(BIN / "pdserve"), "launch",
                           "--config", str(path), "--down", timeout_s=300)
            assert "stopped 4 actors" in out.stdout, out.stdout[-3000:]
            _wait("the relaunched workers' processes to exit", lambda: not _alive(relaunched), 60)
            assert _worker_actors(head, namespace) == [] and _actors(head, namespace, "RouterActor") == []
            assert not _answers(redis_url)
            proc_b.terminate()  # SIGTERM: a clean exit
            assert proc_b.wait(30) == 0
        print(f"launch to ready: {ready_s:.1f} s", file=sys.stderr)
    finally:
        head.stop()
    assert not _alive(head.pids), f"left running: {_alive(head.pids)}"
    assert not _alive(_mentioning(head.tmp))
