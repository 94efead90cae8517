"""Pure statistics over RequestRecords; definitions follow vLLM's ``bench serve``.

TTFT: send to the first content chunk. ITL: gaps between content chunks, pooled over requests.
TPOT: (E2E - TTFT) / (output_tokens - 1) per request with more than one output token.
E2E: send to the end of the stream. Percentiles interpolate linearly (numpy's default).
Throughputs and goodput divide by the benchmark duration; only successful requests count.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.bench.client import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")
_SLO_ALIASES = {"e2el": "e2e"}  # vLLM's name for the same metric


@dataclass(frozen=True)
class Dist:
    """A latency distribution in ms; the statistics are None when there are no samples."""

    count: int
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    peak_concurrency: int  # most requests in flight at once, as measured
    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2e_ms: Dist
    slos_ms: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None  # None when no SLO was given
    goodput: float | None = None  # good requests / s
    errors: dict[str, int] = field(default_factory=dict)  # message -> count, most frequent first


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation; ValueError when empty."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=float), p))


def dist_ms(values_s: Iterable[float]) -> Dist:
    """Mean, median, p90 and p99 of values given in seconds, reported in ms."""
    ms = np.asarray(list(values_s), dtype=float) * 1000.0
    if ms.size == 0:
        return Dist(count=0)
    p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
    return Dist(count=int(ms.size), mean=float(ms.mean()), median=p50, p90=p90, p99=p99)


def tpot_s(rec: RequestRecord) -> float | None:
    """Time per output token after the first; None for failures and single-token outputs."""
    if not rec.success or rec.ttft_s is None or rec.output_tokens <= 1:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def parse_slos(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50", "e2e:3000"] -> {"ttft": 500.0, ...} in ms."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        name = _SLO_ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of ms") from None
        if not ms > 0:
            raise ValueError(f"bad SLO {item!r}: the limit must be > 0 ms")
        slos[name] = ms
    return slos


def meets_slos(rec: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """A successful request that meets every given SLO (a single-token output has TPOT 0)."""
    if not rec.success:
        return False
    values_s = {"ttft": rec.ttft_s, "tpot": tpot_s(rec) or 0.0, "e2e": rec.e2e_s}
    return all(values_s[name] is not None and values_s[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests whose [start, start + e2e) intervals overlap."""
    events = []
    for r in records:
        events += [(r.start_s, 1), (r.start_s + r.e2e_s, -1)]
    peak = current = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts on ties
        current += delta
        peak = max(peak, current)
    return peak


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slos_ms: Mapping[str, float] | None = None
) -> Summary:
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    good = sum(meets_slos(r, slos_ms) for r in ok) if slos_ms else None
    errors = Counter(r.error or "unknown error" for r in failed)
    return Summary(
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        peak_concurrency=peak_concurrency(records),
        ttft_ms=dist_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot_ms=dist_ms(tpots),
        itl_ms=dist_ms(gap for r in ok for gap in r.itl_s),
        e2e_ms=dist_ms(r.e2e_s for r in ok),
        slos_ms=dict(slos_ms or {}),
        good_requests=good,
        goodput=per_s(good) if good is not None else None,
        errors=dict(errors.most_common()),
    )
