"""Microbenchmark: F.linear (bf16 / fp32) vs wint8 / wint4 weight-only layers on CPU.

Usage: python benchmarks/quant_linear.py [--threads 2] [--iters 50]
Prints median milliseconds per call and the speed-up over bf16 F.linear.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.layers.quant import quantize_linear

SHAPES = [(576, 1536), (1536, 576), (576, 49152)]  # (in, out)
BATCHES = (1, 8, 32)


def median_ms(fns: list[Callable[[], object]], iters: int) -> list[float]:
    """Median ms per call of each fn; calls are interleaved so that load from
    other processes hits all variants alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}")
    print(f"{'in->out':>12} {'M':>3} {'bf16 ms':>8} {'fp32 ms':>8} {'wint8 ms':>9} {'wint4 ms':>9} {'w8 x':>6} {'w4 x':>6}")
    with torch.inference_mode():
        for k, n in SHAPES:
            w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
            w32 = w.float()
            q8 = quantize_linear(w, None, "wint8")
            q4 = quantize_linear(w, None, "wint4")
            for m in BATCHES:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                x32 = x.float()
                t_bf, t_32, t8, t4 = median_ms(
                    [lambda: F.linear(x, w), lambda: F.linear(x32, w32), lambda: q8(x), lambda: q4(x)], args.iters
                )
                print(
                    f"{k:>5}->{n:<6} {m:>3} {t_bf:8.3f} {t_32:8.3f} {t8:9.3f} {t4:9.3f} "
                    f"{t_bf / t8:6.2f} {t_bf / t4:6.2f}"
                )
            nb = w.numel() * w.element_size()
            print(
                f"{'':>12} bytes: bf16 {nb / 2**20:.2f} MiB, wint8 {q8.quantized_nbytes() / 2**20:.2f} MiB, "
                f"wint4 {q4.quantized_nbytes() / 2**20:.2f} MiB"
            )


if __name__ == "__main__":
    main()
