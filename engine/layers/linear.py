"""Linear layer that picks the fast matmul for bf16 weights on the CPU at hand.

On CPUs without native bf16 arithmetic (AVX2 only, no AVX-512 BF16 / AMX), oneDNN emulates
bf16 matmuls; measured on such a machine (benchmarks/quant_linear.py, 2 threads): a 32-row
576->1536 bf16 matmul takes ~4.9 ms against ~1.7 ms in float32, while at 1 row (decode at
batch 1, bandwidth-bound) bf16 is as fast and reads half the bytes. So single rows use the bf16
weight, and matmuls over at least UPCAST_MIN_ROWS rows use a float32 copy of it, made on first
use (upcasting per call cost as much as the matmul). Numerically this is the bf16 model computed
with float32 products and sums, as oneDNN does; the price is memory: the copy is twice the size
of the bf16 weights.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

UPCAST_MIN_ROWS = 8


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def upcast_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Should a matmul of `x` by this bf16 `weight` run in float32 here?"""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]
        and not cpu_has_native_bf16()
    )


def float32_copy(owner: torch.nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `weight`, cached on `owner` (rebuilt if the weight object changes)."""
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] is not weight:
        cached = (weight, weight.float())
        owner.__dict__[name] = cached
    return cached[1]


class Linear(torch.nn.Linear):
    """nn.Linear whose bf16 matmuls over many rows run in float32 on CPUs without bf16 units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if upcast_for(x, self.weight):
            w = float32_copy(self, "_weight_fp32", self.weight)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), w, bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
