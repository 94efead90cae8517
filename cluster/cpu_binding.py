"""Which CPU cores each worker on this host runs on (pure planning, plus applying it in-process).

Two workers whose torch threads float over the same cores spin against each other: OpenMP
threads busy-wait between parallel regions, so a prefill worker's long matmuls stall a decode
worker's short steps. `plan_cpu_sets` gives each worker its own cores, in start order, the way
vLLM's `VLLM_CPU_OMP_THREADS_BIND` does:

- `"auto"`: consecutive slices of the cores this process may use, `num_cpus` per worker (its
  threads plus one core per other expert-parallel rank); when they do not all fit, nothing is
  pinned (oversubscribed cores are better shared by the scheduler than stacked by us).
- `"none"`: no pinning.
- an explicit list, `"0|1"` or `"0-1|2,3"`: one core set per worker, `|` between workers.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

logger = logging.getLogger(__name__)

CoreSet = tuple[int, ...]


def parse_core_list(text: str) -> CoreSet:
    """`"0-2,5"` -> (0, 1, 2, 5); ValueError on anything else."""
    cores: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty core range in {text!r}")
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad core range {part!r} in {text!r} (expected e.g. 0-1,4)") from None
        if a < 0 or b < a:
            raise ValueError(f"bad core range {part!r} in {text!r}")
        cores.extend(range(a, b + 1))
    if len(set(cores)) != len(cores):
        raise ValueError(f"core list {text!r} names a core twice")
    return tuple(cores)


def validate_binding(mode: str) -> str:
    """The binding setting as given, or ValueError (for config validation)."""
    if mode not in ("auto", "none"):
        for part in mode.split("|"):
            parse_core_list(part)
    return mode


def plan_cpu_sets(mode: str, num_cpus: Sequence[int], available: Sequence[int]) -> list[CoreSet | None]:
    """One core set (or None: not pinned) per worker, in start order. Pure: no I/O."""
    if mode == "none":
        return [None] * len(num_cpus)
    if mode == "auto":
        cores = sorted(available)
        if sum(num_cpus) > len(cores):
            return [None] * len(num_cpus)
        out: list[CoreSet | None] = []
        pos = 0
        for n in num_cpus:
            out.append(tuple(cores[pos : pos + n]))
            pos += n
        return out
    sets = [parse_core_list(p) for p in mode.split("|")]
    if len(sets) != len(num_cpus):
        raise ValueError(f"cpu binding {mode!r} lists {len(sets)} core sets for {len(num_cpus)} workers")
    for s, n in zip(sets, num_cpus):
        if len(s) < n:
            raise ValueError(f"core set {s} is smaller than the {n} CPUs its worker uses")
        missing = sorted(set(s) - set(available))
        if missing:
            raise ValueError(f"cores {missing} are not available to this process (it may use {sorted(available)})")
    return list(sets)


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_process(cores: CoreSet) -> None:
    """Pin every thread of this process (and the threads it starts later) to `cores`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError, OSError) as exc:
            logger.debug("could not pin thread %s: %s", tid, exc)
    logger.info("pinned to cores %s", ",".join(map(str, cores)))


def reset_niceness() -> None:
    """Every thread of this process back to nice 0 where it runs niced (Linux niceness is per
    thread; threads started later inherit their creator's). Without the privilege to raise
    priority, one warning says how to start Ray instead."""
    for tid in os.listdir("/proc/self/task"):
        try:
            nice = os.getpriority(os.PRIO_PROCESS, int(tid))
            if nice > 0:
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            logger.warning("worker threads run at nice %d (Ray's worker_niceness) and may not be raised; "
                           "start Ray with RAY_worker_niceness=0", nice)
            return
