"""Benchmark output: the console table, the result JSON and the PNG plot."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.bench.client import RequestRecord
from cluster.bench.metrics import Dist, Summary, tpot_s

logger = logging.getLogger(__name__)

_WIDTH = 50
_SECTIONS = (
    ("ttft_ms", "TTFT", "Time to First Token"),
    ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl_ms", "ITL", "Inter-token Latency"),
    ("e2e_ms", "E2E", "End-to-end Latency"),
)
_MAX_ERRORS_SHOWN = 5


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    elif value is None:
        value = "n/a"
    return f"{label + ':':<40} {value}"


def format_table(summary: Summary, *, max_concurrency: int | None, request_rate: float, interrupted: bool) -> str:
    """A console table laid out like vLLM's ``bench serve`` result."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=_WIDTH, c="=")]
    if interrupted:
        lines.append(_row("Interrupted", "yes (partial results)"))
    lines += [
        _row("Successful requests", summary.completed),
        _row("Failed requests", summary.failed),
        _row("Request rate configured (RPS)", "inf" if math.isinf(request_rate) else f"{request_rate:.2f}"),
        _row("Maximum request concurrency", max_concurrency),
        _row("Peak concurrency measured", summary.peak_concurrency),
        _row("Benchmark duration (s)", summary.duration_s),
        _row("Total input tokens", summary.total_input_tokens),
        _row("Total generated tokens", summary.total_output_tokens),
        _row("Request throughput (req/s)", summary.request_throughput),
    ]
    if summary.goodput is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in summary.slos_ms.items())
        lines.append(_row("Goodput SLOs (ms)", slos))
        lines.append(_row("Good requests", summary.good_requests))
        lines.append(_row("Request goodput (req/s)", summary.goodput))
    lines += [
        _row("Output token throughput (tok/s)", summary.output_throughput),
        _row("Total token throughput (tok/s)", summary.total_token_throughput),
    ]
    for attr, short, title in _SECTIONS:
        dist: Dist = getattr(summary, attr)
        lines.append("{s:{c}^{n}}".format(s=title, n=_WIDTH, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            lines.append(_row(f"{label} {short} (ms)", getattr(dist, stat)))
    if summary.errors:
        lines.append("{s:{c}^{n}}".format(s="Errors", n=_WIDTH, c="-"))
        for message, count in list(summary.errors.items())[:_MAX_ERRORS_SHOWN]:
            lines.append(f"{count:>6} x {message}")
        if len(summary.errors) > _MAX_ERRORS_SHOWN:
            lines.append(f"  ... {len(summary.errors) - _MAX_ERRORS_SHOWN} more kinds (see the result JSON)")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def record_to_json(rec: RequestRecord) -> dict[str, Any]:
    """One request as JSON, times in ms."""
    tpot = tpot_s(rec)
    return {
        "index": rec.index,
        "success": rec.success,
        "error": rec.error,
        "start_ms": rec.start_s * 1000.0,
        "ttft_ms": rec.ttft_s * 1000.0 if rec.ttft_s is not None else None,
        "tpot_ms": tpot * 1000.0 if tpot is not None else None,
        "e2e_ms": rec.e2e_s * 1000.0,
        "itl_ms": [gap * 1000.0 for gap in rec.itl_s],
        "prompt_tokens": rec.prompt_tokens,
        "output_tokens": rec.output_tokens,
        "usage_reported": rec.usage_reported,
    }


def _finite(value: Any) -> Any:
    """inf/nan are not JSON: write them as strings (the request rate may be inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(
    path: str | Path,
    config: Mapping[str, Any],
    summary: Summary,
    records: Sequence[RequestRecord],
    *,
    interrupted: bool = False,
) -> None:
    """config + summary + per-request records in one file."""
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "config": dict(config),
        "summary": dataclasses.asdict(summary),
        "requests": [record_to_json(r) for r in records],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_plot(path: str | Path, records: Sequence[RequestRecord], title: str = "") -> None:
    """TTFT and TPOT histograms, latency CDFs, and TTFT/E2E over the run, as a PNG."""
    # The Figure/Agg canvas API draws without pyplot, so no global backend is switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    ok = [r for r in records if r.success]
    ttft = [r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None]
    tpot = [t * 1000.0 for t in (tpot_s(r) for r in ok) if t is not None]
    e2e = [r.e2e_s * 1000.0 for r in ok]
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_ttft, ax_tpot), (ax_cdf, ax_time) = fig.subplots(2, 2)

    for ax, values, name in ((ax_ttft, ttft, "TTFT"), (ax_tpot, tpot, "TPOT")):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
        ax.set(title=f"{name} histogram (n={len(values)})", xlabel=f"{name} (ms)", ylabel="requests")

    for values, name in ((ttft, "TTFT"), (tpot, "TPOT"), (e2e, "E2E")):
        if values:
            xs = sorted(values)
            ax_cdf.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    ax_cdf.set(title="CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
    if ok and min(e2e) > 0:
        ax_cdf.set_xscale("log")  # TPOT and E2E differ by orders of magnitude
        ax_cdf.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax_cdf.xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    if ok:
        ax_cdf.legend()

    starts = [r.start_s for r in ok]
    ax_time.scatter(starts, e2e, s=8, label="E2E")
    ax_time.scatter([r.start_s for r in ok if r.ttft_s is not None], ttft, s=8, label="TTFT")
    failed = [r for r in records if not r.success]
    if failed:
        ax_time.scatter([r.start_s for r in failed], [r.e2e_s * 1000.0 for r in failed], s=16, marker="x",
                        color="tab:red", label=f"failed ({len(failed)})")
    ax_time.set(title="Latency over the run", xlabel="request start (s)", ylabel="ms")
    if records:
        ax_time.legend()

    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _minor_log_label(x: float, _pos: int) -> str:
    """Plain labels at 2x and 5x each power of ten, so a log axis reads 20, 50, 100, 200."""
    if x <= 0:
        return ""
    lead = round(x / 10 ** math.floor(math.log10(x)))
    return f"{x:g}" if lead in (2, 5) else ""
