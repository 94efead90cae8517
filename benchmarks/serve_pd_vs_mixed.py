"""Disaggregated (1 prefill + 1 decode) vs colocated (2 mixed workers) on this machine.

Same cores for both (two 1-thread workers), same workload (random 256-token prompts, 64 output
tokens, ignore_eos), same request rates, run back to back in one session; `pdserve bench` (the
CLI) measures each. Prints a table with ratios (P/D over mixed) and writes the JSON files.

    .venv/bin/python benchmarks/serve_pd_vs_mixed.py --rates 0.25 0.5 1 --num-prompts 24
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import ClusterConfig, EngineArgs  # noqa: E402
from cluster.launch import ServeSession  # noqa: E402


def bench(url: str, rate: float, args, out: Path, tokenizer: str, seed: int) -> dict:
    """One `pdserve bench` run. Each rate gets its own prompts (seed), the same for every setup, so
    no run finds its prompts already in a prefix cache."""
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--base-url", url, "--dataset", "random",
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts",
           str(args.num_prompts), "--request-rate", str(rate), "--seed", str(seed), "--tokenizer", tokenizer,
           "--disable-tqdm", "--result-json", str(out), "--goodput", f"ttft:{args.slo_ttft}", f"tpot:{args.slo_tpot}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--kv-transport", choices=["nixl", "grpc"], default="nixl")
    ap.add_argument("--slo-ttft", type=float, default=2000.0, help="ms")
    ap.add_argument("--slo-tpot", type=float, default=200.0, help="ms")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from engine.loader import resolve_model_path

    tokenizer = str(resolve_model_path(None))
    engine = EngineArgs(num_kv_blocks=512)
    setups = {
        "pd": ClusterConfig(engine=engine, prefill=1, decode=1, port=0, kv_transport=args.kv_transport),
        "mixed": ClusterConfig(engine=engine, mixed=2, prefill=0, decode=0, port=0),
    }
    results: dict[str, dict[float, dict]] = {}
    for name, config in setups.items():
        session = ServeSession(config)
        try:
            url = session.start()
            bench(url, 1.0, argparse.Namespace(**{**vars(args), "num_prompts": 2}), Path(tempfile.mktemp()), tokenizer,
                  seed=999)
            results[name] = {r: bench(url, r, args, out_dir / f"serve_{name}_rate{r}.json", tokenizer, seed=i)
                             for i, r in enumerate(args.rates)}
        finally:
            session.stop()
    print(f"\n{args.num_prompts} requests, {args.input_len} in / {args.output_len} out, 2 workers x 1 thread each, "
          f"KV over {args.kv_transport}; SLO ttft<={args.slo_ttft:.0f}ms tpot<={args.slo_tpot:.0f}ms")
    print("| rate req/s | setup | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | E2E p50 ms | goodput req/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in args.rates:
        for name in setups:
            s = results[name][r]
            print(f"| {r} | {name} | {s['output_throughput']:.1f} | {s['ttft_ms']['median']:.0f} | {s['ttft_ms']['p99']:.0f} "
                  f"| {s['tpot_ms']['median']:.0f} | {s['itl_ms']['p99']:.0f} | {s['e2e_ms']['median']:.0f} "
                  f"| {s['goodput']:.2f} |")
        pd, mx = results["pd"][r], results["mixed"][r]
        print(f"| {r} | pd/mixed | {pd['output_throughput'] / mx['output_throughput']:.2f}x "
              f"| {pd['ttft_ms']['median'] / mx['ttft_ms']['median']:.2f}x | | "
              f"{pd['tpot_ms']['median'] / mx['tpot_ms']['median']:.2f}x | "
              f"{pd['itl_ms']['p99'] / mx['itl_ms']['p99']:.2f}x | | |")


if __name__ == "__main__":
    main()
