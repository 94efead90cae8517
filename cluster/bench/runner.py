"""Dispatches requests on an arrival schedule, capped by a concurrency limit."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cluster.bench.client import RequestRecord
from cluster.bench.workload import BenchRequest

logger = logging.getLogger(__name__)

SendFn = Callable[[BenchRequest, float], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class RunResult:
    records: tuple[RequestRecord, ...]  # in request order; requests never sent are absent
    duration_s: float  # first send to last completion (or to the interrupt)
    interrupted: bool


async def run_schedule(
    requests: Sequence[BenchRequest],
    offsets: Sequence[float],
    send: SendFn,
    *,
    max_concurrency: int | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Send request i at offsets[i] seconds (later if max_concurrency requests are in flight).

    Cancelling the calling task stops the run: requests not yet sent are dropped, those in flight
    are recorded as failed ("interrupted"), and the partial result is returned, not raised.
    """
    if len(requests) != len(offsets):
        raise ValueError("one offset per request is needed")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be >= 1, got {max_concurrency}")
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bench_start = time.perf_counter()

    async def one(req: BenchRequest, offset: float) -> RequestRecord | None:
        sent_at: float | None = None
        try:
            # Sleep to an absolute time, so a slow event loop does not push the schedule back.
            delay = bench_start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()
            try:
                sent_at = time.perf_counter()
                record = await send(req, bench_start)
            except Exception as exc:  # noqa: BLE001 - a bug in send must not lose the run
                logger.exception("request %d raised", req.index)
                record = _failed(req, sent_at, bench_start, f"{type(exc).__name__}: {exc}")
            finally:
                if sem is not None:
                    sem.release()
        except asyncio.CancelledError:
            if sent_at is None:
                return None
            record = _failed(req, sent_at, bench_start, "interrupted")
        if on_done is not None:
            on_done(record)
        return record

    tasks = [asyncio.create_task(one(r, o)) for r, o in zip(requests, offsets)]
    interrupted = False
    try:
        await asyncio.gather(*tasks)  # one() never raises, except for a cancellation
    except asyncio.CancelledError:
        interrupted = True
        logger.warning("benchmark interrupted: stopping the requests in flight")
        for task in tasks:
            task.cancel()
        # The tasks swallow their cancellation and return a record, so this collects them all.
        await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - bench_start
    records = [
        t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None
    ]
    return RunResult(tuple(r for r in records if r is not None), duration, interrupted)


def _failed(req: BenchRequest, sent_at: float, bench_start: float, error: str) -> RequestRecord:
    return RequestRecord(
        index=req.index, success=False, start_s=sent_at - bench_start,
        e2e_s=time.perf_counter() - sent_at, prompt_tokens=req.prompt_len, error=error,
    )
