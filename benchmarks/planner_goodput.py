"""Goodput on a phase-shifting workload: the planner against every static split and all-mixed.

The workload (one JSONL, sent in order at one Poisson rate): phase A, long prompts with short
outputs (prefill-heavy), then phase B, short prompts with long outputs (decode-heavy). Setups,
each with 3 one-thread workers on this machine, run back to back in one session and measured by
`pdserve bench` (the CLI): 2 prefill + 1 decode, 1 prefill + 2 decode, 3 mixed, and the planner
starting from 1 prefill + 2 decode (it may move one worker each way). Goodput counts requests
within the SLO (TTFT and TPOT). Prints a table with each setup's ratio to the best static split.

    .venv/bin/python benchmarks/planner_goodput.py --rate 0.5 --phase-requests 30
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import ClusterConfig, EngineArgs, PlannerSettings  # noqa: E402
from cluster.launch import ServeSession  # noqa: E402


def workload(path: Path, tokenizer, n: int, long_in: int, short_out: int, short_in: int, long_out: int,
             seed: int) -> None:
    """Phase A (n x long_in in / short_out out) then phase B (n x short_in in / long_out out);
    prompts are random token ids decoded to text (fresh per request: no prefix-cache hits)."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    with path.open("w") as f:
        for length, out in [(long_in, short_out)] * n + [(short_in, long_out)] * n:
            text = tokenizer.decode(rng.integers(100, vocab - 100, size=length).tolist())
            f.write(json.dumps({"prompt": text, "output_len": out}) + "\n")


def bench(url: str, data: Path, args, out: Path, tokenizer: str) -> dict:
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--base-url", url, "--dataset", "jsonl", "--dataset-path",
           str(data), "--request-rate", str(args.rate), "--seed", "1", "--tokenizer", tokenizer, "--ignore-eos",
           "--disable-tqdm", "--result-json", str(out), "--goodput", f"ttft:{args.slo_ttft}", f"tpot:{args.slo_tpot}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.5, help="requests/s over both phases")
    ap.add_argument("--phase-requests", type=int, default=30)
    ap.add_argument("--long-in", type=int, default=768)
    ap.add_argument("--short-out", type=int, default=16)
    ap.add_argument("--short-in", type=int, default=32)
    ap.add_argument("--long-out", type=int, default=160)
    ap.add_argument("--slo-ttft", type=float, default=3000.0, help="ms")
    ap.add_argument("--slo-tpot", type=float, default=150.0, help="ms")
    ap.add_argument("--setups", nargs="+", default=["2p1d", "1p2d", "mixed", "planner"])
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from engine.loader import resolve_model_path

    tok_path = str(resolve_model_path(None))
    data = out_dir / "planner_workload.jsonl"
    workload(data, AutoTokenizer.from_pretrained(tok_path), args.phase_requests, args.long_in, args.short_out,
             args.short_in, args.long_out, seed=0)
    engine = EngineArgs(num_kv_blocks=1024, max_model_len=2048)
    common = dict(engine=engine, port=0, kv_transport="nixl", cpu_bind="none")
    planner = PlannerSettings(enabled=True, slo_ttft_ms=args.slo_ttft, slo_itl_ms=args.slo_tpot, interval_s=2,
                              hysteresis=2, cooldown_s=20, global_cooldown_s=10, lease_ttl_s=10,
                              latency_window_s=20, prefill_queue_tokens_high=2 * args.long_in, decode_seqs_high=8)
    setups = {
        "2p1d": ClusterConfig(prefill=2, decode=1, **common),
        "1p2d": ClusterConfig(prefill=1, decode=2, **common),
        "mixed": ClusterConfig(mixed=3, prefill=0, decode=0, **common),
        "planner": ClusterConfig(prefill=1, decode=2, planner=planner, **common),
    }
    results: dict[str, dict] = {}
    switches: dict[str, str] = {}
    for name in args.setups:
        session = ServeSession(setups[name])
        try:
            url = session.start()
            warm = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
            warm.write(json.dumps({"prompt": "Hello there", "output_len": 4}) + "\n")
            warm.close()
            bench(url, Path(warm.name), argparse.Namespace(**{**vars(args), "rate": 10.0}), Path(tempfile.mktemp()),
                  tok_path)
            results[name] = bench(url, data, args, out_dir / f"planner_goodput_{name}.json", tok_path)
            if name == "planner":
                import httpx

                metrics = httpx.get(f"{url}/metrics", timeout=10).text
                switches[name] = "; ".join(line for line in metrics.splitlines()
                                           if line.startswith("pdserve:role_switches_total{"))
        finally:
            session.stop()
    static = [results[n]["goodput"] for n in ("2p1d", "1p2d") if n in results]
    best = max(static) if static else None
    print(f"\nphase A: {args.phase_requests} x {args.long_in} in / {args.short_out} out, then phase B: "
          f"{args.phase_requests} x {args.short_in} in / {args.long_out} out; Poisson {args.rate} req/s; 3 workers x "
          f"1 thread; SLO ttft<={args.slo_ttft:.0f}ms tpot<={args.slo_tpot:.0f}ms")
    print("| setup | goodput req/s | vs best static | served req/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        ratio = f"{s['goodput'] / best:.2f}x" if best else "-"
        print(f"| {name} | {s['goodput']:.3f} | {ratio} | {s['request_throughput']:.3f} | {s['ttft_ms']['median']:.0f} "
              f"| {s['ttft_ms']['p90']:.0f} | {s['tpot_ms']['median']:.0f} | {s['tpot_ms']['p90']:.0f} |")
    for name, line in switches.items():
        print(f"{name} switches: {line or 'none'}")


if __name__ == "__main__":
    main()
