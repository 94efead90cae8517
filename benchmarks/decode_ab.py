"""Decode step time of this checkout against another one (a baseline commit), on the same host,
in alternating runs so that the host's drift falls on both alike.

    git worktree add /tmp/base <commit>
    python benchmarks/decode_ab.py --baseline /tmp/base --batches 1 8 32 --runs 3

Each run is a fresh process (its own checkout first on sys.path, the same venv): B requests of
256 random prompt tokens are prefilled, then the median of 25 decode steps is taken. Prints each
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
import json, statistics, sys, time, torch
from engine import LLM, SamplingParams
eng = LLM(max_num_seqs=64).engine
res = {}
for B in map(int, sys.argv[1:]):
    g = torch.Generator().manual_seed(0)
    for i in range(B):
        eng.add_request(f"b{B}r{i}", torch.randint(100, 40000, (256,), generator=g).tolist(),
                        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in list(eng.scheduler.running) + list(eng.scheduler.waiting)):
        eng.step()
    ts = []
    for _ in range(25):
        t0 = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t0)
    while eng.has_unfinished_requests():
        eng.step()
    res[B] = statistics.median(ts) * 1e3
print(json.dumps(res))
"""


def run(tree: Path, batches: list[int]) -> dict[int, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'proto'}"}
    out = subprocess.run([sys.executable, "-c", _CHILD, *map(str, batches)], env=env, cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    got: dict[str, list[dict[int, float]]] = {"baseline": [], "this": []}
    for i in range(args.runs):
        for name, tree in (("baseline", args.baseline.resolve()), ("this", here)):
            r = run(tree, args.batches)
            got[name].append(r)
            print(f"run {i + 1} {name:8s} " + "  ".join(f"B={b}: {r[b]:.2f} ms" for b in args.batches), flush=True)
    print("\n| batch | baseline step ms | this step ms | baseline / this |\n|---|---|---|---|")
    for b in args.batches:
        base = statistics.median(r[b] for r in got["baseline"])
        this = statistics.median(r[b] for r in got["this"])
        print(f"| {b} | {base:.2f} | {this:.2f} | {base / this:.2f}x |")


if __name__ == "__main__":
    main()
