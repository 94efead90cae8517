"""Where a decode step's time goes: GEMMs, attention, sampling and the rest (a benchmark aid).

`decode_breakdown(llm, batch, prompt_len)` puts `batch` requests into decode and times a few
pure-decode steps as the engine runs them (the step), then as many on the per-op path with the
linear layers, the attention blocks and the sampler wrapped by timers (the whole-layer kernel,
engine/layers/layer_decode.py, runs the same kernels but cannot be timed inside). Each category
counts its own time only (attention excludes its qkv/o projections, which count as GEMMs);
"rest" is the step minus the categories: norms, activations, embedding, the scheduler, the
runner's tensor building and Python between them.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Breakdown:
    batch: int
    step_ms: float
    gemm_ms: float
    attention_ms: float
    sampling_ms: float

    @property
    def rest_ms(self) -> float:
        return self.step_ms - self.gemm_ms - self.attention_ms - self.sampling_ms


class _Timers:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                nested = self._stack.pop()
                self.totals[category] += dt - nested
                if self._stack:
                    self._stack[-1] += dt

        return timed


@contextlib.contextmanager
def _patched(timers: _Timers) -> Iterator[None]:
    import engine.layers.mlp as mlp
    import engine.llm_engine as llm_engine
    from engine.layers.attention import Attention
    from engine.layers.linear import Linear
    from engine.layers.quant import WeightOnlyLinear

    targets = [(Linear, "forward", "gemm"), (WeightOnlyLinear, "forward", "gemm"), (mlp, "gate_up_silu", "gemm"),
               (Attention, "forward", "attention"), (llm_engine, "sample", "sampling")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    try:
        for obj, name, cat in targets:
            setattr(obj, name, timers.wrap(cat, getattr(obj, name)))
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def decode_breakdown(llm: Any, batch: int, prompt_len: int, steps: int = 12) -> Breakdown:
    """Per-step times over `steps` pure-decode steps of `batch` prompts: the median step, and each
    category's share of the summed steps applied to it."""
    eng = llm.engine
    vocab = eng.config.model.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 4, ignore_eos=True)
    ids = [f"breakdown-{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, [(97 + 13 * i + 7 * j) % vocab for j in range(prompt_len)], params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in eng.step())
    from engine.layers.layer_decode import per_op_path

    def timed_steps() -> list[float]:
        durations = []
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            durations.append(time.perf_counter() - t0)
        return durations

    step_ms = statistics.median(timed_steps()) * 1e3
    timers = _Timers()
    with _patched(timers), per_op_path():
        durations = timed_steps()
    while eng.has_unfinished_requests():
        eng.step()
    total = sum(durations)
    scale = statistics.median(durations) / total * 1e3  # per-step ms, on the median step's scale
    return Breakdown(batch, step_ms, timers.totals["gemm"] * scale, timers.totals["attention"] * scale,
                     timers.totals["sampling"] * scale)


def render_breakdown(rows: list[Breakdown], prompt_len: int) -> str:
    out = [f"Decode step breakdown ({prompt_len}-token contexts), ms per step (share):", "",
           "| batch | step | GEMMs | attention | sampling | rest |", "|---|---|---|---|---|---|"]
    for r in rows:
        def cell(v: float) -> str:
            return f"{v:.2f} ({100 * v / r.step_ms:.0f}%)"

        out.append(f"| {r.batch} | {r.step_ms:.2f} | {cell(r.gemm_ms)} | {cell(r.attention_ms)} "
                   f"| {cell(r.sampling_ms)} | {cell(r.rest_ms)} |")
    return "\n".join(out)
