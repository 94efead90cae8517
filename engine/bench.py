"""Offline throughput benchmark: pdserve's engine against HF transformers, and against the machine.

`pdserve bench-engine [options]` (or `make bench`). For each workload (batch B, prompt length L,
output length N) both engines generate exactly N greedy tokens for B random prompts submitted at
once. The machine's limits are measured in the same process: read bandwidth (`torch.sum`) gives a
decode roofline (one step must read every weight once), and a large bf16 `F.linear` gives the
matmul rate that prefill is compared with.

Decode step time is the median wall time of `engine.step()` calls made after every request of
the batch has its first token (all of them pure decode steps of the full batch), recorded while
`llm.generate` runs. Prefill time is a separate `llm.generate` run with max_tokens=1.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.step_breakdown import decode_breakdown, render_breakdown

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One workload's results (times in seconds unless named otherwise)."""

    name: str
    batch: int
    prompt_len: int
    output_len: int
    pd_s: float
    pd_tok_s: float
    pd_total_tok_s: float
    decode_step_ms: float
    prefill_s: float
    prefill_gflops: float
    roofline_step_ms: float
    pct_roofline: float
    hf_s: float | None = None
    hf_tok_s: float | None = None
    ratio: float | None = None


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth in GB/s: best of `reps` `torch.sum` passes over a `mib` MiB float32 tensor."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    torch.sum(x)
    best = min(_median_time(lambda: torch.sum(x), 1) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def measure_matmul(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.bfloat16) -> float:
    """GFLOP/s of `F.linear` on [n, n] x [n, n]^T in `dtype`, best of `reps`."""
    a, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, w)
    best = min(_median_time(lambda: F.linear(a, w), 1) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def weight_stats(llm: LLM) -> tuple[int, int, int]:
    """(bytes of all weights, dedup'd so a tied embedding counts once; body params; LM head params)."""
    model = llm.engine.runner.model
    seen: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rope" not in name:
            seen.setdefault(t.data_ptr(), t)
    nbytes = sum(t.numel() * t.element_size() for t in seen.values())
    embed, head = model.embed_tokens.weight, getattr(model.lm_head, "weight", None)
    total = sum(t.numel() for t in seen.values())
    head_n = head.numel() if head is not None else embed.numel()
    untied_head = head is not None and head.data_ptr() != embed.data_ptr()
    body = total - embed.numel() - (head_n if untied_head else 0)
    return nbytes, body, head_n


def _prompts(gen: torch.Generator, vocab: int, batch: int, length: int) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def run_pdserve(llm: LLM, prompts: list[list[int]], out_len: int) -> tuple[float, list[float]]:
    """One `llm.generate` over the whole batch: (wall seconds, durations of pure-decode steps)."""
    eng = llm.engine
    step = eng.step
    started: set[str] = set()
    decode_steps: list[float] = []

    def timed_step() -> list:
        all_started = len(started) >= len(prompts)
        t0 = time.perf_counter()
        outs = step()
        if all_started:
            decode_steps.append(time.perf_counter() - t0)
        started.update(o.request_id for o in outs)
        return outs

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    eng.step = timed_step  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
    finally:
        del eng.step  # back to the class method
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    return wall, decode_steps


def run_hf(model: Any, prompts: list[list[int]], out_len: int, pad_id: int) -> float:
    """Wall seconds of one HF `generate` producing exactly `out_len` greedy tokens per row."""
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                             min_new_tokens=out_len, do_sample=False, pad_token_id=pad_id)
        wall = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + out_len
    return wall


def bench_row(name: str, b: int, plen: int, olen: int, llm: LLM, hf: Any, gen: torch.Generator,
              args: argparse.Namespace, limits: dict[str, float]) -> Row:
    """Run one workload `args.repeats` times on each engine; medians go in the row."""
    vocab = llm.engine.config.model.vocab_size
    walls, steps, prefills, hf_walls = [], [], [], []
    for i in range(args.repeats):
        logger.info("%s: repeat %d/%d", name, i + 1, args.repeats)
        prompts = _prompts(gen, vocab, b, plen)  # fresh prompts each time: no prefix-cache hits
        wall, dsteps = run_pdserve(llm, prompts, olen)
        walls.append(wall)
        steps.extend(dsteps)
        t0 = time.perf_counter()
        llm.generate(_prompts(gen, vocab, b, plen), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        prefills.append(time.perf_counter() - t0)
        if hf is not None:
            hf_walls.append(run_hf(hf, prompts, olen, limits["pad_id"]))
    wall, prefill = statistics.median(walls), statistics.median(prefills)
    step_ms = statistics.median(steps) * 1e3 if steps else float("nan")
    roof_ms = limits["weight_bytes"] / (limits["bandwidth_gbs"] * 1e9) * 1e3
    flops = 2 * limits["body_params"] * b * plen + 2 * limits["head_params"] * b
    row = Row(name, b, plen, olen, wall, b * olen / wall, b * (plen + olen) / wall, step_ms, prefill,
              flops / prefill / 1e9, roof_ms, 100 * roof_ms / step_ms)
    if hf_walls:
        row.hf_s = statistics.median(hf_walls)
        row.hf_tok_s = b * olen / row.hf_s
        row.ratio = row.pd_tok_s / row.hf_tok_s
    return row


def profile_decode(llm: LLM, steps: int = 8, prompt_len: int = 8) -> str:
    """torch.profiler over `steps` batch-1 decode steps; the top 15 ops by self CPU time."""
    eng = llm.engine
    prompt = list(range(100, 100 + prompt_len))
    eng.add_request("bench-profile", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True))
    while not eng.step():
        pass  # the step that returns the first token ends the prefill
    eng.step()  # one unprofiled decode step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        per_step = (time.perf_counter() - t0) / steps
    while eng.has_unfinished_requests():
        eng.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return f"{table}\n(profiled decode step, batch 1: {per_step * 1e3:.2f} ms incl. profiler overhead)"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render(rows: list[Row], limits: dict[str, float]) -> str:
    """The markdown result table plus the machine-limit lines."""
    out = [
        "| workload | pdserve out tok/s | pdserve total tok/s | HF tok/s | ratio | decode step ms "
        "| roofline step ms | % of roofline | prefill s | prefill GFLOP/s (% matmul) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.name} | {r.pd_tok_s:.1f} | {r.pd_total_tok_s:.1f} | {_fmt(r.hf_tok_s)} | {_fmt(r.ratio, '.2f')}x "
            f"| {r.decode_step_ms:.2f} | {r.roofline_step_ms:.2f} | {r.pct_roofline:.0f}% | {r.prefill_s:.3f} "
            f"| {r.prefill_gflops:.0f} ({100 * r.prefill_gflops / limits['matmul_gflops']:.0f}%) |"
        )
    out += [
        "",
        f"Machine: read bandwidth {limits['bandwidth_gbs']:.1f} GB/s (torch.sum), matmul (F.linear 2048^2) "
        f"bf16 {limits['matmul_bf16_gflops']:.0f} / fp32 {limits['matmul_fp32_gflops']:.0f} GFLOP/s, "
        f"{limits['threads']:.0f} threads.",
        f"Weights read per decode step: {limits['weight_bytes'] / 1e6:.1f} MB -> roofline step "
        f"{rows[0].roofline_step_ms if rows else float('nan'):.2f} ms (batch-B roofline = B x 1000 / step ms tok/s; "
        "KV reads not counted).",
        f"Prefill: best {max((r.prefill_gflops for r in rows), default=0):.0f} GFLOP/s vs matmul "
        f"{limits['matmul_gflops']:.0f} GFLOP/s (FLOPs = 2 x body params x prompt tokens + LM head on "
        "the last token; attention not counted).",
    ]
    return "\n".join(out)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench-engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--quantization", choices=["wint8", "wint4"], default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=_ints, default=[1, 8, 32], help="batches of the prefill+decode rows")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--decode-batches", type=_ints, default=[1, 32], help="batches of the decode-bound rows")
    p.add_argument("--decode-prompt-len", type=int, default=8)
    p.add_argument("--decode-output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--skip-hf", action="store_true", help="do not load or run transformers")
    p.add_argument("--profile", action="store_true", help="profile batch-1 decode steps (top 15 ops)")
    p.add_argument("--breakdown-batches", type=_ints, default=[1, 8, 32],
                   help="batches of the decode step breakdown (GEMMs, attention, sampling, rest); '' to skip")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.quick:
        args.batches, args.prompt_len, args.output_len = [1, 4], 32, 8
        args.decode_batches, args.decode_output_len, args.repeats = [1], 16, 1
        args.breakdown_batches = [1, 4]
    torch.set_num_threads(args.threads)
    workloads = [(f"B={b} p{args.prompt_len}/o{args.output_len}", b, args.prompt_len, args.output_len)
                 for b in args.batches]
    workloads += [(f"B={b} p{args.decode_prompt_len}/o{args.decode_output_len} (decode)", b,
                   args.decode_prompt_len, args.decode_output_len) for b in args.decode_batches]

    logger.info("measuring machine limits")
    limits: dict[str, float] = {
        "threads": float(args.threads),
        "bandwidth_gbs": measure_bandwidth(128 if args.quick else 512),
        "matmul_bf16_gflops": measure_matmul(1024 if args.quick else 2048),
        "matmul_fp32_gflops": measure_matmul(1024 if args.quick else 2048, dtype=torch.float32),
    }
    # The engine runs batched bf16 matmuls in float32 where that is faster (engine/layers/linear.py),
    # so the limit is the faster of the two.
    limits["matmul_gflops"] = max(limits["matmul_bf16_gflops"], limits["matmul_fp32_gflops"])
    max_seqs = max([b for _, b, _, _ in workloads] + list(args.breakdown_batches))
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_num_seqs=max(max_seqs, 1),
              max_num_batched_tokens=args.max_num_batched_tokens)
    limits["weight_bytes"], limits["body_params"], limits["head_params"] = weight_stats(llm)
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(llm.model_path, dtype=torch.bfloat16).eval()
        limits["pad_id"] = hf.generation_config.pad_token_id or hf.generation_config.eos_token_id or 0
        if isinstance(limits["pad_id"], list):
            limits["pad_id"] = limits["pad_id"][0]

    gen = torch.Generator().manual_seed(args.seed)
    vocab = llm.engine.config.model.vocab_size
    logger.info("warming up")
    for b in (1, 2):  # batch 1 and batch > 1 take different decode paths
        run_pdserve(llm, _prompts(gen, vocab, b, 16), 4)
    if hf is not None:
        run_hf(hf, _prompts(gen, vocab, 2, 16), 4, int(limits["pad_id"]))

    rows = [bench_row(name, b, pl, ol, llm, hf, gen, args, limits) for name, b, pl, ol in workloads]
    print(render(rows, limits))
    breakdown = [decode_breakdown(llm, b, args.prompt_len) for b in args.breakdown_batches]
    if breakdown:
        print("\n" + render_breakdown(breakdown, args.prompt_len))
    if args.profile:
        print("\nTop 15 ops by self CPU time, batch-1 decode:\n" + profile_decode(llm))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "limits": limits,
                       "rows": [asdict(r) for r in rows],
                       "breakdown": [{**asdict(b), "rest_ms": b.rest_ms} for b in breakdown]}, f, indent=2)
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
