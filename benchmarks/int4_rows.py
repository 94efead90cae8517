"""wint4 layers: pdserve's 4-bit GEMV (ops.linear_int4) against torch's CPU int4 kernel, by row count.

Usage: python benchmarks/int4_rows.py [--rows 1,4,8,16,32,64,256] [--threads 2]

30 layers of the default model's projection shapes (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536), random weights quantized with the engine's group 32, bf16 activations. Each
repeat runs all 120 projections once with each kernel, alternating, so both see the same
machine; prints the medians and torch / pdserve (above 1: pdserve's kernel is faster). This is
what `engine.layers.quant.int4_gemv_max_rows` is set from.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8,16,32,64,256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from engine.kernels import cpu_ops
    from engine.layers.quant import WeightOnlyInt4Linear, quantize_linear
    from engine.layers.quantize_model import WINT4_GROUP_SIZE

    ops = cpu_ops()
    if ops is None:
        sys.exit("the CPU kernels are not available here")
    gen = torch.Generator().manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30
    layers: list[WeightOnlyInt4Linear] = []
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        layers.append(quantize_linear(w, None, "wint4", group_size=WINT4_GROUP_SIZE))
    if layers[0].layout != "cpu_kernel":
        sys.exit("torch's CPU int4 kernel is not usable in this build")
    tiles = [layer._gemv_layout() for layer in layers]
    print(f"ISA {ops.isa()}, {args.threads} threads, {len(layers)} projections")
    print("| rows | pdserve ms | torch ms | torch / pdserve |\n|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in (576, 1536)}

        def ours() -> None:
            for layer, t in zip(layers, tiles):
                ops.linear_int4(xs[layer.in_features], *t, layer.out_features, layer.group_size, None)

        def theirs() -> None:
            for layer in layers:
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[layer.in_features], layer.weight_int4,
                                                           layer.group_size, layer.scales_and_zeros)

        times: dict[str, list[float]] = {"ours": [], "torch": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("torch", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
        print(f"| {rows} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
