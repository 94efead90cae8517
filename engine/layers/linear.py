"""Linear layer that picks the fast matmul for bf16 weights on the CPU at hand.

Decode batches (up to `gemv_max_rows()` rows; on AMX hosts prefill chunks too) go through the
kernels' packed bf16 linear, which streams each weight once per call. Larger matmuls on CPUs without native bf16 arithmetic (AVX2
only, no AVX-512 BF16 / AMX), where oneDNN emulates bf16 (a 32-row 576->1536 bf16 matmul ~4.9 ms
against ~1.7 ms in float32, benchmarks/quant_linear.py), run in float32 on a copy of the weight
made on first use (upcasting per call cost as much as the matmul). Numerically this is the bf16
model computed with float32 products and sums, as oneDNN does; the price is memory: the copy is
twice the size of the bf16 weights.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops

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


@functools.cache
def gemv_max_rows() -> int:
    """Most rows for which the kernels' packed linear beats torch's bf16 matmul here (measured per
    op with benchmarks/packed_linear.py and in whole decode steps with `pdserve bench-engine`;
    `PDSERVE_GEMV_MAX_ROWS` overrides). It streams each weight once with no per-call re-layout;
    on AMX its tiles do 16 rows x 32 k per instruction, and the AVX-512 BF16 dot products run at
    about oneDNN's own bf16 rate on hosts without AMX, so both win through prefill-sized chunks
    (512 rows); AVX2's emulated dot products grow in cost with every row."""
    env = os.environ.get("PDSERVE_GEMV_MAX_ROWS")
    if env:
        return int(env)
    ops = cpu_ops()
    isa = ops.isa() if ops is not None else ""
    if isa in ("amx_bf16", "avx512_bf16"):
        # AVX-512 BF16 without AMX (AMD Zen 4): the kernel beat oneDNN's bf16 GEMM at every row
        # count from 1 to 1,024 (1.7x cold at 32 rows); whole decode steps at batch 32 took
        # 48 ms instead of 77 with the old limit of 16.
        return 512
    # Without bf16 units the alternative is oneDNN on the float32 copy, which streams twice the
    # bytes: whole decode steps on an AVX2 host were 3x faster at batch 8 and 2x at 32 this way.
    return 32


def packed_copy(owner: torch.nn.Module, weight: torch.Tensor, interleave: bool = False) -> torch.Tensor | None:
    """The kernels' packed layout of a bf16 `weight`, made once and cached on `owner` (rebuilt if
    the weight object changes); None where the layout does not apply (odd K: torch's matmul).
    `interleave`: the gate/up-interleaved layout of a gate_up weight (linear_packed_silu)."""
    key = "_weight_packed_il" if interleave else "_weight_packed"
    cached = owner.__dict__.get(key)
    if cached is None or cached[0] is not weight:
        from engine.kernels.packing import pack_bf16

        packed = pack_bf16(weight, interleave=interleave) if weight.shape[1] % 2 == 0 else None
        cached = (weight, packed)
        owner.__dict__[key] = cached
    return cached[1]


def fused_silu_applies(weight: torch.Tensor) -> bool:
    """Can linear_packed_silu take this gate_up weight [2I, K] here (AMX, bf16, I % 16, K % 32)?"""
    ops = cpu_ops()
    return (ops is not None and ops.isa() == "amx_bf16" and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and weight.shape[0] % 32 == 0 and weight.shape[1] % 32 == 0)


def gate_up_silu(owner: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """silu(x . gate) * (x . up) in one kernel for a few hundred bf16 rows on AMX hosts (the
    projections are not rounded to bf16 in between), or None where it does not apply."""
    if x.dtype != torch.bfloat16 or not fused_silu_applies(weight):
        return None
    k = x.shape[-1]
    rows = x.numel() // k
    if rows > gemv_max_rows():
        return None
    x2 = x.reshape(rows, k)
    if x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    half = weight.shape[0] // 2
    return cpu_ops().linear_packed_silu(x2, packed_copy(owner, weight, interleave=True), half).view(*x.shape[:-1], half)


def small_linear(owner: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' GEMV for a few bf16 rows, or None where torch's matmul is the better choice."""
    if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    k = x.shape[-1]
    rows = x.numel() // k
    if rows > gemv_max_rows():
        return None
    ops = cpu_ops()
    packed = None if ops is None else packed_copy(owner, weight)
    if packed is None:
        return None
    x2 = x.reshape(rows, k)
    if x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    return ops.linear_packed(x2, packed, weight.shape[0], bias).view(*x.shape[:-1], weight.shape[0])


def prepack(model: torch.nn.Module) -> int:
    """Pack every bf16 Linear's weight now (not on the first decode step); returns bytes packed.
    A gated MLP's gate_up takes the interleaved layout where the fused kernel applies (only)."""
    if cpu_ops() is None:
        return 0
    from engine.layers.mlp import GatedMLP

    fused = {id(m.gate_up_proj) for m in model.modules()
             if isinstance(m, GatedMLP) and type(m.gate_up_proj) is Linear and m.gate_up_proj.bias is None
             and fused_silu_applies(m.gate_up_proj.weight)}
    total = 0
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
            packed = packed_copy(mod, mod.weight, interleave=id(mod) in fused)
            total += 0 if packed is None else packed.numel() * packed.element_size()
    return total


class Linear(torch.nn.Linear):
    """nn.Linear whose bf16 matmuls over many rows run in float32 on CPUs without bf16 units,
    and over a few rows in the kernels' GEMV."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = small_linear(self, x, self.weight, self.bias)
        if y is not None:
            return y
        if upcast_for(x, self.weight):
            w = float32_copy(self, "_weight_fp32", self.weight)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), w, bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)
