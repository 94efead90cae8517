"""Process-group lifecycle for an expert-parallel group: rank 0 is the caller's process, ranks
1..N-1 are started by a launcher: child processes (`python -m engine.parallel.worker`, the
default) or, in the cluster, Ray actors in the worker's placement group.

Channels: one TCP connection per rank carries rank 0's commands as JSON lines (one per forward,
re-placements, "stop"); a gloo process group carries the tensor collectives. Ranks block reading
their connection, which has no timeout (an idle engine is fine) and ends when rank 0 dies, so a
rank never outlives it; rank 0 sees a rank's death as the end of that rank's connection. Every
collective has the group's timeout, so a stuck rank fails the step instead of hanging it.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
DEATH_VISIBLE_S = 2.0


class EPGroupError(RuntimeError):
    """A rank of the expert-parallel group died or stopped answering; the group is closed."""


class GlooCollectives:
    """The all-gather and all-to-all an EP layer needs, over one gloo group; keeps the time spent
    in them (communication plus waiting for the slowest rank) for the benchmarks."""

    def __init__(self, pg: dist.ProcessGroup, rank: int, size: int) -> None:
        self.pg, self.rank, self.size = pg, rank, size
        self.seconds = 0.0
        self.calls = 0

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([out], [t]).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's `t` into every rank's `t` (same shape and dtype everywhere)."""
        t0 = time.perf_counter()
        self.pg.broadcast(t, 0).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def all_to_all(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty(sum(recv_splits), *t.shape[1:], dtype=t.dtype, device=t.device)
        self.pg.alltoall_base(out, t.contiguous(), recv_splits, send_splits).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class RankHandles(Protocol):
    """Ranks 1..N-1 as their launcher started them."""

    def pids(self) -> list[int]: ...

    def exit_status(self, index: int) -> str | None:
        """How rank `index + 1` ended ("exited with code 9"), or None while it runs."""
        ...

    def wait(self, timeout_s: float) -> bool:
        """Wait for every rank to end by itself; False if some still run after the timeout."""
        ...

    def kill(self) -> None:
        """End every rank now (idempotent)."""
        ...


Launcher = Callable[[list[dict[str, Any]]], RankHandles]  # one config per rank 1..N-1


class ChildProcesses:
    """Ranks as child processes of this one (the offline engine)."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "engine.parallel.worker", json.dumps(cfg)],
                                       stdin=subprocess.DEVNULL, env=env) for cfg in configs]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def exit_status(self, index: int) -> str | None:
        code = self.procs[index].poll()
        return None if code is None else f"exited with code {code}"

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self) -> None:
        _kill_processes(self.procs)


def _kill_processes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill is not ignorable
            logger.error("EP rank pid %d did not exit after SIGKILL", p.pid)


def _close_all(ranks: list[RankHandles], sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()
    for r in ranks:
        r.kill()


class EPGroup:
    """Rank 0's side: starts the other ranks, forms the gloo group, sends them commands."""

    def __init__(self, size: int, worker_config: dict[str, Any], timeout_s: float = 30.0,
                 launcher: Launcher | None = None) -> None:
        if size < 2:
            raise ValueError(f"an expert-parallel group needs at least 2 ranks, got {size}")
        self.size = size
        self.rank = 0
        self.closed = False
        self._sockets: list[socket.socket] = []  # index i: rank i + 1
        self._ranks: list[RankHandles] = []
        self._finalizer = weakref.finalize(self, _close_all, self._ranks, self._sockets)
        timeout = timedelta(seconds=timeout_s)
        # Port 0 twice: the OS picks free loopback ports and we keep them bound (no race).
        self._store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            configs = [{**worker_config, "rank": r, "size": size, "port": self._store.port,
                        "command_port": listener.getsockname()[1], "timeout_s": timeout_s} for r in range(1, size)]
            self._ranks.append((launcher or ChildProcesses)(configs))
            logger.info("EP group: started ranks 1..%d (pids %s)", size - 1, self.pids)
            self.comm = GlooCollectives(dist.ProcessGroupGloo(self._store, 0, size, timeout), 0, size)
            self._accept(listener, timeout_s)
        except Exception as e:
            listener.close()
            self.fail(e)
        listener.close()

    def _accept(self, listener: socket.socket, timeout_s: float) -> None:
        by_rank: dict[int, socket.socket] = {}
        listener.settimeout(timeout_s)
        while len(by_rank) < self.size - 1:
            conn, _ = listener.accept()
            conn.settimeout(timeout_s)
            hello = conn.makefile("rb").readline()
            by_rank[int(json.loads(hello)["rank"])] = conn
            conn.settimeout(None)
        self._sockets.extend(by_rank[r] for r in range(1, self.size))

    @property
    def pids(self) -> list[int]:
        return self._ranks[0].pids() if self._ranks else []

    def _dead(self) -> list[str]:
        dead = []
        ranks = self._ranks[0] if self._ranks else None
        readable = select.select(self._sockets, [], [], 0)[0] if self._sockets else []
        for i, s in enumerate(self._sockets):
            status = ranks.exit_status(i) if ranks is not None else None
            # A rank never writes after its hello: a readable connection is one that has ended.
            if status is None and s in readable:
                try:
                    ended = s.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    ended = True
                status = "closed its connection" if ended else None
            if status is not None:
                pid = ranks.pids()[i] if ranks is not None else "?"
                dead.append(f"expert-parallel rank {i + 1} (pid {pid}) {status}")
        return dead

    def check_alive(self) -> None:
        dead = self._dead()
        if dead:
            self.fail(None, "; ".join(dead))

    def send(self, command: dict[str, Any]) -> None:
        """One JSON line to every other rank (they act on it in the same order)."""
        if self.closed:
            raise EPGroupError("the expert-parallel group is closed")
        self.check_alive()
        line = (json.dumps(command, separators=(",", ":")) + "\n").encode()
        try:
            for s in self._sockets:
                s.sendall(line)
        except OSError as e:
            self.fail(e)

    def fail(self, cause: BaseException | None, message: str | None = None) -> None:
        """Close the group and raise EPGroupError naming the dead ranks."""
        if message is None:
            dead = self._dead() if not self.closed else []
            # A collective can fail a moment before the dead rank's connection or exit status
            # shows (its sockets close one by one): look again briefly, to name the culprit.
            deadline = time.monotonic() + DEATH_VISIBLE_S
            while not dead and not self.closed and time.monotonic() < deadline:
                time.sleep(0.05)
                dead = self._dead()
            message = "expert-parallel group failed: " + ("; ".join(dead) if dead else f"{cause}")
        self.close(graceful=False)
        raise EPGroupError(message) from cause

    def close(self, graceful: bool = True) -> None:
        """Stop the other ranks (a stop command, then kill after a grace period)."""
        if self.closed:
            return
        self.closed = True
        if graceful and self._ranks:
            for s in self._sockets:
                try:
                    s.sendall(b'{"op":"stop"}\n')
                except OSError:
                    pass
            if not self._ranks[0].wait(STOP_GRACE_S):
                logger.warning("EP ranks %s ignored stop; killing them", self.pids)
        self._finalizer()


def join_group(cfg: dict[str, Any]) -> tuple[GlooCollectives, dist.TCPStore, Callable[[], dict[str, Any] | None]]:
    """A non-zero rank's side: the collectives, the store (keep it alive as long as the group) and
    a function returning rank 0's next command (None once rank 0 is gone)."""
    rank, size = int(cfg["rank"]), int(cfg["size"])
    timeout = timedelta(seconds=float(cfg["timeout_s"]))
    store = dist.TCPStore("127.0.0.1", int(cfg["port"]), size, False, timeout=timeout)
    conn = socket.create_connection(("127.0.0.1", int(cfg["command_port"])), timeout=timeout.total_seconds())
    conn.sendall((json.dumps({"rank": rank}) + "\n").encode())
    conn.settimeout(None)
    reader = conn.makefile("rb")

    def read_command() -> dict[str, Any] | None:
        line = reader.readline()
        return json.loads(line) if line else None  # EOF: rank 0 is gone

    comm = GlooCollectives(dist.ProcessGroupGloo(store, rank, size, timeout), rank, size)
    return comm, store, read_command
