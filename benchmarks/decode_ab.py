"""Decode step time of this checkout against another one (a baseline commit), on the same host,
in alternating runs so that the host's drift falls on both alike.

    git worktree add /tmp/base <commit>
    python benchmarks/decode_ab.py --baseline /tmp/base --batches 1 8 32 --runs 3

Each run is a fresh process (its own checkout first on sys.path, the same venv): the median
decode step of B requests after 256-token prompts, as `engine.step_breakdown` times it. Prints each
run and the ratio of medians (baseline / this).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys
from engine import LLM
from engine.step_breakdown import decode_breakdown
quant = sys.argv[1] or None
llm = LLM(max_num_seqs=64, quantization=quant)
print(json.dumps({B: decode_breakdown(llm, B, 256, steps=25).step_ms for B in map(int, sys.argv[2:])}))
"""


def run(tree: Path, batches: list[int], quantization: str) -> dict[int, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'proto'}"}
    out = subprocess.run([sys.executable, "-c", _CHILD, quantization, *map(str, batches)], env=env, cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quantization", default="", help="wint8 or wint4 (both checkouts); default: bf16")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    got: dict[str, list[dict[int, float]]] = {"baseline": [], "this": []}
    for i in range(args.runs):
        for name, tree in (("baseline", args.baseline.resolve()), ("this", here)):
            r = run(tree, args.batches, args.quantization)
            got[name].append(r)
            print(f"run {i + 1} {name:8s} " + "  ".join(f"B={b}: {r[b]:.2f} ms" for b in args.batches), flush=True)
    print("\n| batch | baseline step ms | this step ms | baseline / this |\n|---|---|---|---|")
    for b in args.batches:
        base = statistics.median(r[b] for r in got["baseline"])
        this = statistics.median(r[b] for r in got["this"])
        print(f"| {b} | {base:.2f} | {this:.2f} | {base / this:.2f}x |")


if __name__ == "__main__":
    main()
