"""The LM head of the default model: bf16 packed GEMV against its int8 copy (engine/layers/quant_head.py).

Usage: python benchmarks/quant_head.py [--rows 1,2,4,8] [--threads 2]

Loads the default model's head (its tied embedding table, 49,152 x 576 bf16), builds both
layouts, and times one call of each per row count, interleaved call by call (median of many),
so both see the same machine. Prints ms per call, the bytes each reads, the effective GB/s and
the ratio, and the largest logit difference between the two on real hidden states (the final
norm of a short greedy run).
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
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from engine import LLM, SamplingParams
    from engine.kernels import cpu_ops
    from engine.layers.linear import packed_copy
    from engine.layers.quant_head import INT8_HEAD_GROUP, enable_int8_head, int8_head_copy

    ops = cpu_ops()
    if ops is None:
        sys.exit("the CPU kernels are not available here")
    llm = LLM(dtype="bfloat16")
    model = llm.engine.runner.model
    head = model.lm_head
    hiddens: list[torch.Tensor] = []
    original = model.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        hiddens.append(hidden.detach().clone())
        return original(hidden)

    model.compute_logits = capture
    llm.generate(["Write a short poem about the sea.", "What is 17 * 23?"],
                 SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    model.compute_logits = original
    real = torch.cat(hiddens)[:64]

    enable_int8_head(head)
    tiles, scales = int8_head_copy(head)
    packed = packed_copy(head, head.weight)
    n, k = head.weight.shape
    bf16_bytes = packed.numel() * 2
    int8_bytes = tiles.numel() + scales.numel() * 4
    print(f"ISA {ops.isa()}, {args.threads} threads; head {n} x {k}: bf16 {bf16_bytes / 1e6:.1f} MB, "
          f"int8 {int8_bytes / 1e6:.1f} MB")
    print("| rows | bf16 ms | int8 ms | bf16 GB/s | int8 GB/s | bf16 / int8 |")
    print("|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        x = real[:rows].contiguous()
        calls = {"bf16": lambda: ops.linear_packed(x, packed, n, None),
                 "int8": lambda: ops.linear_int8(x, tiles, scales, n, INT8_HEAD_GROUP, None)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        b, i = statistics.median(times["bf16"]), statistics.median(times["int8"])
        print(f"| {rows} | {b * 1e3:.3f} | {i * 1e3:.3f} | {bf16_bytes / b / 1e9:.1f} | {int8_bytes / i / 1e9:.1f} "
              f"| {b / i:.2f}x |")
    ref = ops.linear_packed(real, packed, n, None).float()
    got = torch.cat([ops.linear_int8(real[r:r + 4].contiguous(), tiles, scales, n, INT8_HEAD_GROUP, None)
                     for r in range(0, real.shape[0], 4)]).float()
    diff = (got - ref).abs()
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # The int8 weights' own error: float32 in and out, against the bf16 weight in float64.
    exact = real.double() @ head.weight.double().T
    own = ops.linear_int8(real.float(), tiles, scales, n, INT8_HEAD_GROUP, None).double()
    print(f"int8 weight error alone (float32 logits vs float64 over the bf16 weight): max "
          f"{(own - exact).abs().max().item():.4f}, mean {(own - exact).abs().mean().item():.5f}")
    print(f"logits on {real.shape[0]} real hidden states: max |int8 - bf16| {diff.max().item():.4f}, "
          f"mean {diff.mean().item():.5f}; top logit {ref.max(-1).values.mean().item():.2f} on average; "
          f"raw argmax agreement {same:.3f} (before the float32 re-scoring of near-ties)")


if __name__ == "__main__":
    main()
