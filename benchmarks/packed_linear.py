"""The kernels' packed linear against torch's bf16 matmul, per op, in one process.

    python benchmarks/packed_linear.py [--rows 1,8,32,256]

Two settings: "hot" times one weight over and over (it stays in cache: the op's compute), "cold"
walks 30 layers' worth of the default model's shapes, as a forward does (the weights come from
memory). Prints each one's time, its weight bandwidth or FLOP rate, and the ratio to torch. The
limit `gemv_max_rows()` (engine/layers/linear.py) comes from where the ratio crosses 1.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.kernels.packing import pack_bf16

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate_up, down


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,16,32,64,256,512,1024")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit("the CPU kernels are not available here (see the log line)")
    rows = [int(r) for r in args.rows.split(",")]
    print(f"kernel ISA: {ops.isa()}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(n, k, generator=g).bfloat16() for n, k in SHAPES] for _ in range(30)]
    packed = [[pack_bf16(w) for w in layer] for layer in layers]
    nbytes = sum(w.numel() * 2 for layer in layers for w in layer)
    flops_per_row = sum(2 * w.numel() for layer in layers for w in layer)
    print("\n| rows | hot 3072x576: kernel ms | torch ms | ratio | cold 30 layers: kernel ms | GB/s | TFLOP/s "
          "| torch ms | ratio |\n|---|---|---|---|---|---|---|---|---|")
    for b in rows:
        xs = {k: torch.randn(b, k, generator=g).bfloat16() for k in (576, 1536)}
        w, pw = layers[0][2], packed[0][2]
        hot_k = median_ms(lambda: ops.linear_packed(xs[576], pw, w.shape[0], None), args.reps * 4)
        hot_t = median_ms(lambda: F.linear(xs[576], w), args.reps * 4)

        def kernel() -> None:
            for layer in packed:
                for (n, k), pk in zip(SHAPES, layer):
                    ops.linear_packed(xs[k], pk, n, None)

        def plain() -> None:
            for layer in layers:
                for wt in layer:
                    F.linear(xs[wt.shape[1]], wt)

        cold_k, cold_t = median_ms(kernel, args.reps), median_ms(plain, args.reps)
        print(f"| {b} | {hot_k:.3f} | {hot_t:.3f} | {hot_t / hot_k:.2f}x | {cold_k:.2f} | {nbytes / cold_k / 1e6:.1f} "
              f"| {b * flops_per_row / cold_k / 1e9:.2f} | {cold_t:.2f} | {cold_t / cold_k:.2f}x |")


if __name__ == "__main__":
    main()
