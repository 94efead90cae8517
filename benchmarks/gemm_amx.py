"""The kernels' AMX GEMM (linear_packed, linear_packed_silu) against torch's bf16 matmul on the
default model's prefill shapes, in one process.

    python benchmarks/gemm_amx.py [--rows 16,64,256,512,2048] [--reps 15]

Each shape is timed hot (one weight over and over, as a prefill chunk's layer sees its own
weight) as the median of `--reps` calls, for the kernel and for F.linear on the same bf16
tensors; prints GFLOP/s of both and their ratio (kernel / torch; above 1 the kernel is faster).
"gate_up+silu" is the fused kernel against F.linear followed by silu(gate) * up in torch.
Run it on a quiet machine: the ratio within one run is what counts.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.kernels.packing import pack_bf16

# SmolLM2-135M: (name, N, K)
SHAPES = [("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("gate_up+silu", 3072, 576), ("lm_head", 49152, 576)]


def median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16,64,256,512,2048")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    args = p.parse_args()
    ops = cpu_ops()
    if ops is None or ops.isa() != "amx_bf16":
        raise SystemExit(f"needs the kernels on an AMX host (kernel ISA: {ops.isa() if ops else None})")
    wanted = set(args.shapes.split(","))
    print(f"kernel ISA: {ops.isa()}, {torch.get_num_threads()} threads")
    print("\n| shape | N | K | rows | kernel GFLOP/s | torch GFLOP/s | ratio |\n|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, n, k in SHAPES:
        if name not in wanted:
            continue
        w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
        silu = name.endswith("+silu")
        pw = pack_bf16(w, interleave=silu)
        for rows in (int(r) for r in args.rows.split(",")):
            if name == "lm_head" and rows > 512:
                continue
            x = torch.randn(rows, k, generator=g).bfloat16()
            if silu:
                half = n // 2
                kern = lambda: ops.linear_packed_silu(x, pw, half)  # noqa: E731

                def ref() -> torch.Tensor:
                    gu = F.linear(x, w)
                    return F.silu(gu[:, :half]) * gu[:, half:]
            else:
                kern = lambda: ops.linear_packed(x, pw, n, None)  # noqa: E731
                ref = lambda: F.linear(x, w)  # noqa: E731
            reps = max(args.reps, 3) if rows * n * k < 1e9 else max(args.reps // 3, 3)
            tk, tt = median_s(kern, reps), median_s(ref, reps)
            flop = 2.0 * rows * n * k
            print(f"| {name} | {n} | {k} | {rows} | {flop / tk / 1e9:.0f} | {flop / tt / 1e9:.0f} | {tt / tk:.2f} |")


if __name__ == "__main__":
    main()
