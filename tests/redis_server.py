"""A real `redis-server` for tests: own process on a free loopback port, nothing persisted.

`RedisServer().start()` -> url; `stop()` ends that pid and waits; `restart()` brings it back on
the same port (empty, as after a crash) so clients keep their URL.
"""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import redis

from cluster.state.embedded import _die_with_parent

logger = logging.getLogger(__name__)


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "the `redis-server` binary is not on PATH; tests need a real Redis: "
            "`sudo apt-get install -y redis-server` (Redis 7)"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process started by the test session."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 10.0) -> None:
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="pdtredis-")

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client(self) -> redis.Redis:
        """A synchronous client (decoded strings) for test assertions."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        binary = redis_server_binary()
        # The port is probed then released, so another process may take it first: retry a fresh
        # one, but keep a fixed port (restart) fixed.
        tries = 1 if self.port is not None else 5
        err = ""
        for _ in range(tries):
            port = self.port or _free_port()
            if self._launch(binary, port):
                self.port = port
                logger.info("redis-server pid %d on port %d", self._proc.pid, port)  # type: ignore[union-attr]
                return self.url
            err = self._log_tail()
        raise RuntimeError(f"redis-server did not start:\n{err}")

    def _launch(self, binary: str, port: int) -> bool:
        log = Path(self._dir) / "redis.log"
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self._dir, "--daemonize", "no", "--logfile", str(log)]
        # If the test process dies hard (a crash skips fixture teardown), the kernel stops Redis too.
        in_main = threading.current_thread() is threading.main_thread()
        pre = _die_with_parent if sys.platform == "linux" and in_main else None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=pre)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0) as c:
                    if c.ping():
                        return True
            except redis.ConnectionError:
                time.sleep(0.02)
        self._terminate()
        return False

    def _log_tail(self) -> str:
        log = Path(self._dir) / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def _terminate(self, timeout_s: float = 5.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        self._proc = None

    def stop(self) -> None:
        """Stop the server (by its pid) and wait until it has exited."""
        self._terminate()

    def restart(self) -> str:
        """Stop and start again on the same port; the data is gone, as after a crash."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
