"""Process-group lifecycle for an offline expert-parallel group: rank 0 is the caller's process,
ranks 1..N-1 are child processes (`python -m engine.parallel.worker`).

Channels: each child's stdin carries rank 0's commands as JSON lines (one per forward, and
"stop"); a gloo process group carries the tensor collectives. Children block on stdin, which
has no timeout (an idle engine is fine) and ends when rank 0 dies, so a child never outlives it.
Every collective has the group's timeout, so a stuck rank fails the step instead of hanging it.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


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

    def all_to_all(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty(sum(recv_splits), *t.shape[1:], dtype=t.dtype, device=t.device)
        self.pg.alltoall_base(out, t.contiguous(), recv_splits, send_splits).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill is not ignorable
            logger.error("EP rank pid %d did not exit after SIGKILL", p.pid)
        if p.stdin is not None and not p.stdin.closed:
            try:
                p.stdin.close()
            except OSError:
                pass


class EPGroup:
    """Rank 0's side: starts the other ranks, forms the gloo group, sends them commands."""

    def __init__(self, size: int, worker_config: dict[str, Any], timeout_s: float = 30.0) -> None:
        if size < 2:
            raise ValueError(f"an expert-parallel group needs at least 2 ranks, got {size}")
        self.size = size
        self.rank = 0
        self.closed = False
        timeout = timedelta(seconds=timeout_s)
        # Port 0: the OS picks a free loopback port and the store keeps it bound (no race).
        self._store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _terminate, self.procs)
        for rank in range(1, size):
            cfg = {**worker_config, "rank": rank, "size": size, "port": self._store.port, "timeout_s": timeout_s}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "engine.parallel.worker", json.dumps(cfg)], stdin=subprocess.PIPE, env=env,
            ))
        logger.info("EP group: started ranks 1..%d (pids %s) on port %d", size - 1,
                    [p.pid for p in self.procs], self._store.port)
        try:
            self.comm = GlooCollectives(dist.ProcessGroupGloo(self._store, 0, size, timeout), 0, size)
        except Exception as e:
            self.fail(e)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                self.fail(None, f"expert-parallel rank {rank} (pid {p.pid}) exited with code {p.returncode}")

    def send(self, command: dict[str, Any]) -> None:
        """One JSON line to every other rank (they act on it in the same order)."""
        if self.closed:
            raise EPGroupError("the expert-parallel group is closed")
        self.check_alive()
        line = (json.dumps(command, separators=(",", ":")) + "\n").encode()
        try:
            for p in self.procs:
                assert p.stdin is not None
                p.stdin.write(line)
                p.stdin.flush()
        except OSError as e:
            self.fail(e)

    def fail(self, cause: BaseException | None, message: str | None = None) -> None:
        """Close the group and raise EPGroupError naming the dead ranks."""
        if message is None:
            dead = [f"rank {r} (pid {p.pid}) exited with code {p.returncode}"
                    for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
            message = "expert-parallel group failed: " + ("; ".join(dead) if dead else f"{cause}")
        self.close(graceful=False)
        raise EPGroupError(message) from cause

    def close(self, graceful: bool = True) -> None:
        """Stop the other ranks (a stop command, then SIGKILL after a grace period)."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            for p in self.procs:
                try:
                    assert p.stdin is not None
                    p.stdin.write(b'{"op":"stop"}\n')
                    p.stdin.close()
                except OSError:
                    pass
            for p in self.procs:
                try:
                    p.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    logger.warning("EP rank pid %d ignored stop; killing it", p.pid)
        self._finalizer()


def join_group(rank: int, size: int, port: int, timeout_s: float) -> tuple[GlooCollectives, dist.TCPStore]:
    """A child rank's side of the group (keep the store alive as long as the group)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout=timeout)
    return GlooCollectives(dist.ProcessGroupGloo(store, rank, size, timeout), rank, size), store
