"""Prometheus metrics: vLLM's names under `pdserve:`, one registry per router app.

Router-side (measured where the client sees them): time to first token, inter-token latency,
end-to-end latency, queue time, prompt and generation token counters, finished requests by
reason. Worker-side: a collector that, on each scrape, turns the latest `StatsResponse` of every
worker into per-worker series (labels `worker`, `role`; per-expert token counts of MoE models
add `layer` and `expert`). The /metrics handler awaits
`backend.worker_stats()` first and hands the result over, because collectors are synchronous.

Rolling windows (`LatencyWindow`, a minute by default) keep recent TTFT and ITL samples so that, in the same
process, the planner reads their p90 (a histogram's buckets are too coarse and never forget).
Planner series: `pdserve:planner_decisions_total{to}` (switches it asked for and a worker
started), `pdserve:planner_leader` (1 while this router holds the planner lease). From the
workers: `pdserve:role_switches_total{worker,from,to}` (completed switches by direction) and
`pdserve:num_workers{role}` (workers per role among those that answered the scrape),
`pdserve:role_switch_phase_seconds{worker,phase}` (a histogram per switch phase, and fence -> ready
as `total`, kept by each worker's RoleMachine) and `pdserve:sequences_migrated_total{worker,role}`
(running sequences handed to other workers by migrating switches; the target's
`pdserve:requests_resumed_total` counts them in).

`pdserve:request_queue_time_seconds` is an approximation: the Backend protocol does not report
how long a request waited inside a worker, so it is the router-side time from arrival until the
request was handed to the backend (validation, tokenization, limits). Queueing inside workers
shows in `pdserve:num_requests_waiting` and in TTFT.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)

# Buckets as vLLM's, so dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

ROLE_NAMES = {worker_pb2.ROLE_UNSPECIFIED: "unspecified", worker_pb2.ROLE_PREFILL: "prefill",
              worker_pb2.ROLE_DECODE: "decode", worker_pb2.ROLE_MIXED: "mixed"}
FINISH_NAMES = {worker_pb2.FINISH_REASON_STOP: "stop", worker_pb2.FINISH_REASON_LENGTH: "length",
                worker_pb2.FINISH_REASON_ABORT: "abort"}

# (metric name, StatsResponse field, help)
_WORKER_GAUGES = (
    ("pdserve:num_requests_running", "num_requests_running", "Sequences running on the worker."),
    ("pdserve:num_requests_waiting", "num_requests_waiting", "Sequences waiting to be scheduled on the worker."),
    ("pdserve:num_requests_holding_kv", "num_holding_kv", "Prefilled requests whose KV awaits a decode pull."),
    ("pdserve:num_requests_waiting_for_kv", "num_waiting_for_kv", "Decode requests waiting for their KV."),
    ("pdserve:queued_prefill_tokens", "queued_prefill_tokens", "Prompt tokens queued for prefill."),
    ("pdserve:kv_active_leases", "num_active_leases", "KV leases held for decode workers to pull."),
    ("pdserve:worker_epoch", "epoch", "The worker's role epoch."),
    ("pdserve:expert_parallel_size", "expert_parallel_size", "Ranks in the worker's expert-parallel group."),
)
_WORKER_COUNTERS = (
    ("pdserve:prefix_cache_queries", "prefix_cache_queries", "Prefix cache lookups, in blocks."),
    ("pdserve:prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in blocks."),
    ("pdserve:num_preemptions", "num_preemptions", "Sequences preempted for lack of KV blocks."),
    ("pdserve:kv_transfers", "kv_transfers_total", "KV transfers (pulls) completed."),
    ("pdserve:kv_transfer_bytes", "kv_transfer_bytes_total", "Bytes of KV moved between workers."),
    ("pdserve:kv_transfer_seconds", "kv_transfer_seconds_total", "Seconds spent moving KV between workers."),
    ("pdserve:kv_transfer_failures", "kv_transfer_failures_total", "KV transfers that failed."),
    ("pdserve:kv_lease_expired", "kv_lease_expired_total", "KV leases that expired before a pull."),
    ("pdserve:kv_recompute", "kv_recompute_total", "Prompts recomputed after a failed KV transfer."),
    ("pdserve:kv_blocks_skipped", "kv_blocks_skipped_total", "KV blocks not pulled: already in the prefix cache."),
    ("pdserve:kv_blocks_served", "kv_blocks_served_total", "KV blocks this worker sent over gRPC."),
    ("pdserve:requests_resumed", "requests_resumed_total",
     "Requests the worker resumed from another worker's generated tokens (KV recomputed)."),
    ("pdserve:sequences_migrated", "sequences_migrated_total",
     "Running sequences the worker handed to other workers in migrating role switches."),
    ("pdserve:sequences_migrated_in", "sequences_migrated_in_total",
     "Sequences moved to the worker mid-generation with their KV (pulled, not recomputed)."),
    ("pdserve:migration_recompute", "migration_recompute_total",
     "Moved sequences whose KV pull failed, recomputed on the worker instead."),
)


class WorkerStatsCollector:
    """Per-worker series from the stats handed over by the last scrape (`latest`)."""

    def __init__(self) -> None:
        self.latest: Sequence[worker_pb2.StatsResponse] = ()

    def describe(self) -> Iterable[Metric]:
        return ()  # families depend on the workers present; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        labels = ["worker", "role"]
        gauges = {name: GaugeMetricFamily(name, doc, labels=labels) for name, _, doc in _WORKER_GAUGES}
        counters = {name: CounterMetricFamily(name, doc, labels=labels) for name, _, doc in _WORKER_COUNTERS}
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "KV cache usage (1 = full).", labels=labels)
        role_g = GaugeMetricFamily("pdserve:worker_role", "1 for the worker's current role.", labels=labels)
        count_g = GaugeMetricFamily("pdserve:num_workers", "Workers per role (of those that answered).",
                                    labels=["role"])
        switches = CounterMetricFamily("pdserve:role_switches", "Completed role switches of the worker, by "
                                       "direction.", labels=["worker", "from", "to"])
        phases = HistogramMetricFamily("pdserve:role_switch_phase_seconds", "How long the worker's role-switch "
                                       "phases lasted (fenced, draining, migrating, switching, rolling_back; fence "
                                       "to ready as total, or total_rolled_back for undone switches).",
                                       labels=["worker", "phase"])
        per_role = {role: 0 for role in ("prefill", "decode", "mixed")}
        # A counter (monotonic since the worker loaded, reset when it restarts), one series per expert.
        experts = CounterMetricFamily("pdserve:expert_tokens", "Tokens routed to each expert of each MoE layer "
                                      "(layer = index among the MoE layers) since the worker loaded.",
                                      labels=labels + ["layer", "expert"])
        for s in self.latest:
            key = [s.worker_id, ROLE_NAMES.get(s.role, "unspecified")]
            for name, field, _ in _WORKER_GAUGES:
                gauges[name].add_metric(key, float(getattr(s, field)))
            for name, field, _ in _WORKER_COUNTERS:
                counters[name].add_metric(key, float(getattr(s, field)))
            usage.add_metric(key, 1.0 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0.0)
            for role in ("prefill", "decode", "mixed"):
                role_g.add_metric([s.worker_id, role], 1.0 if role == key[1] else 0.0)
            if key[1] in per_role:
                per_role[key[1]] += 1
            for c in s.role_switch_counts:
                switches.add_metric([s.worker_id, ROLE_NAMES.get(c.from_role, "unspecified"),
                                     ROLE_NAMES.get(c.to_role, "unspecified")], float(c.count))
            for h in s.role_switch_phase_seconds:
                phases.add_metric([s.worker_id, h.phase], _cumulative(h), sum_value=h.sum)
            for load in s.expert_load:
                for expert, tokens in enumerate(load.tokens):
                    experts.add_metric(key + [str(load.layer), str(expert)], float(tokens))
        yield from gauges.values()
        yield from counters.values()
        for role, n in per_role.items():
            count_g.add_metric([role], float(n))
        yield usage
        yield role_g
        yield count_g
        yield switches
        yield phases
        yield experts


def _cumulative(h: worker_pb2.PhaseHistogram) -> list[tuple[str, float]]:
    """Prometheus buckets (le, cumulative count) from a worker's per-bucket counts."""
    bounds = [*h.upper_bounds, math.inf]
    return [(floatToGoString(b), float(sum(h.bucket_counts[: i + 1]))) for i, b in enumerate(bounds)]


class BackendCountersCollector:
    """The router's own re-route and resume counts (`backend.counters()`, when the backend has them)."""

    DOCS = {
        "reroutes_total": ("pdserve:router_reroutes", "Requests re-routed after a stale-epoch or mid-switch refusal."),
        "resumes_total": ("pdserve:router_resumes", "Streams resumed on another worker after theirs failed."),
    }

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        for key, value in self.latest.items():
            if key in self.DOCS:
                name, doc = self.DOCS[key]
                family = CounterMetricFamily(name, doc)
                family.add_metric([], float(value))
                yield family


class LatencyWindow:
    """Samples (seconds) of the last `window_s`, for percentiles; `now` is time.perf_counter()."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 20_000) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, value)

    def observe(self, value: float, now: float | None = None) -> None:
        self._samples.append((time.perf_counter() if now is None else now, value))

    def _expire(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def __len__(self) -> int:
        self._expire(time.perf_counter())
        return len(self._samples)

    def percentile(self, q: float, now: float | None = None, min_samples: int = 1) -> float | None:
        """The q-quantile (0 < q <= 1, nearest rank) of the window; None below `min_samples`."""
        self._expire(time.perf_counter() if now is None else now)
        if len(self._samples) < max(min_samples, 1):
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values), max(1, math.ceil(q * len(values)))) - 1]


class RouterMetrics:
    """Every series of one router app, in its own registry (tests build several apps)."""

    def __init__(self, stats_timeout_s: float = 5.0, latency_window_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between streamed token deltas.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("pdserve:request_queue_time_seconds",
                               "Router-side time before the request reached the backend.",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("pdserve:request_success", "Finished sequences by finish reason.",
                               ["finished_reason"], registry=r)
        self.stats_failures = Counter("pdserve:worker_stats_failures", "Scrapes that could not read worker stats.",
                                      registry=r)
        self.planner_decisions = Counter("pdserve:planner_decisions", "Role switches the planner asked for "
                                         "and a worker started, by target role.", ["to"], registry=r)
        self.planner_leader = Gauge("pdserve:planner_leader", "1 while this router's planner holds the "
                                    "leader lease.", registry=r)
        self.recent_ttft = LatencyWindow(latency_window_s)
        self.recent_itl = LatencyWindow(latency_window_s)
        self.workers = WorkerStatsCollector()
        r.register(self.workers)
        self.backend_counters = BackendCountersCollector()
        r.register(self.backend_counters)
        self.stats_timeout_s = stats_timeout_s

    async def render(self, backend) -> bytes:
        """Prometheus text for a scrape: fetch worker stats (async), then collect (sync)."""
        try:
            self.workers.latest = await asyncio.wait_for(backend.worker_stats(), self.stats_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer with the router's own series
            logger.warning("could not read worker stats for /metrics: %s", exc)
            self.stats_failures.inc()
            self.workers.latest = ()
        counters = getattr(backend, "counters", None)
        self.backend_counters.latest = counters() if callable(counters) else {}
        return generate_latest(self.registry)

    def track(self, prompt_lens: Sequence[int], n: int, arrival: float) -> "RequestTracker":
        return RequestTracker(self, prompt_lens, n, arrival)


class RequestTracker:
    """Observes one HTTP request's sequences (index = prompt * n + i) as their chunks arrive."""

    def __init__(self, metrics: RouterMetrics, prompt_lens: Sequence[int], n: int, arrival: float) -> None:
        self.m = metrics
        self.prompt_lens = list(prompt_lens)
        self.n = n
        self.arrival = arrival  # time.perf_counter() when the request arrived
        self._submitted = False
        self._first_token = False
        self._last: dict[int, float] = {}
        self._finished: set[int] = set()
        self._started: set[int] = set()
        self._closed = False

    def submitted(self) -> None:
        if not self._submitted:
            self._submitted = True
            self.m.queue.observe(time.perf_counter() - self.arrival)

    def on_chunk(self, index: int, chunk: worker_pb2.TokenChunk) -> None:
        now = time.perf_counter()
        if index not in self._started:
            self._started.add(index)
            if index % self.n == 0:  # prompt tokens once per prompt, not once per choice
                self.m.prompt_tokens.inc(self.prompt_lens[index // self.n])
        num = len(chunk.token_ids)
        if num:
            if not self._first_token:
                self._first_token = True
                self.m.ttft.observe(now - self.arrival)
                self.m.recent_ttft.observe(now - self.arrival, now)
            last = self._last.get(index)
            if last is not None:
                self.m.itl.observe(now - last)
                self.m.recent_itl.observe(now - last, now)
            self._last[index] = now
            self.m.generation_tokens.inc(num)
        if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
            self._finished.add(index)
            self.m.success.labels(FINISH_NAMES.get(chunk.finish_reason, "abort")).inc()

    def close(self) -> None:
        """End of the request: e2e latency when every sequence finished; the rest count as aborted."""
        if self._closed:
            return
        self._closed = True
        total = len(self.prompt_lens) * self.n
        if len(self._finished) == total:
            self.m.e2e.observe(time.perf_counter() - self.arrival)
        elif self._started:
            self.m.success.labels("abort").inc(total - len(self._finished))
