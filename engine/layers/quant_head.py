"""The int8 copy of the LM head that quantized models (wint4 / wint8) read in small decode batches.

The head is the largest single weight of a small model (SmolLM2-135M: 49,152 x 576 bf16, 56 MB,
a fifth of the model and half of a wint4 model's bytes), and in tied models it is also the
embedding table, which stays bf16. llama.cpp stores it as Q8_0 (int8, one scale per 32 weights)
in the default model's own GGUF; this is the same format, read by the kernels' int8 GEMV
(engine/kernels/csrc/gemv_int8.cpp), so a batch-1 step reads 28 MB instead of 56. The bf16
weight is kept: the logits' near-ties at the top are re-scored from it in float32
(Decoder.compute_logits), so greedy decoding picks what the bf16 head would, and batches
larger than `INT8_HEAD_MAX_ROWS`, where the int8 products cost more than the bytes they save,
use the bf16 GEMV as before.
"""
from __future__ import annotations

import torch

from engine.kernels import cpu_ops

# Weights per scale: GGUF's Q8_0 block (the default model's embedding table is stored that way,
# so this grid reproduces it).
INT8_HEAD_GROUP = 32
# Rows up to which the int8 head beats the bf16 packed GEMV (benchmarks/quant_head.py, Zen 4:
# 2.0x at 1 row, 1.9x at 4, 1.2x at 8, even at 16).
INT8_HEAD_MAX_ROWS = 8
# Logits within this much of a row's maximum are re-scored from the bf16 weight even where the
# relative tolerance is smaller (small top logits): the int8 error on real hidden states of the
# default model stayed under 0.09 (mean 0.008; benchmarks/quant_head.py), besides the bf16
# rounding both heads share.
INT8_HEAD_ABS_TOL = 0.25

_KEY = "_weight_int8_head"


def quantize_int8_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (row, group of `group` k): q = round(w / s), s = max|w| / 127 (zero
    groups get s = 1). Returns q int8 [N, K] and s float32 [N, K/group]."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"group {group} does not divide in_features {k}")
    q = torch.empty(n, k, dtype=torch.int8)
    s = torch.empty(n, k // group)
    chunk = max(1, (1 << 18) // k)  # 1 MiB float32 temporaries
    for r0 in range(0, n, chunk):
        g = weight[r0:r0 + chunk].float().view(-1, k // group, group)
        amax = g.abs().amax(-1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[r0:r0 + chunk] = torch.round(g / scale[..., None]).clamp_(-127, 127).view(-1, k).to(torch.int8)
        s[r0:r0 + chunk] = scale
    return q, s


def enable_int8_head(head: torch.nn.Module) -> bool:
    """Mark `head` (a bf16 nn.Linear on the CPU) to keep an int8 copy, and build it now; False
    where it does not apply (no kernels, not bf16, odd shapes)."""
    w = head.weight
    if (cpu_ops() is None or w.dtype != torch.bfloat16 or w.device.type != "cpu"
            or w.shape[1] % INT8_HEAD_GROUP or head.bias is not None):
        return False
    head.__dict__["_int8_head_enabled"] = True
    return int8_head_copy(head) is not None


def disable_int8_head(head: torch.nn.Module) -> None:
    """Back to the bf16 head for every batch (the copy is dropped)."""
    head.__dict__.pop("_int8_head_enabled", None)
    head.__dict__.pop(_KEY, None)


def int8_head_copy(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed int8 tiles and scales of an enabled head, made once and rebuilt when its weight
    object is replaced (a reload, a tied table swapped); None where the head is not enabled."""
    if not head.__dict__.get("_int8_head_enabled"):
        return None
    weight = head.weight
    cached = head.__dict__.get(_KEY)
    if cached is None or cached[0] is not weight:
        from engine.kernels.packing import pack_int8

        cached = (weight, pack_int8(*quantize_int8_groups(weight.detach(), INT8_HEAD_GROUP)))
        head.__dict__[_KEY] = cached
    return cached[1]


def int8_head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """bf16 logits [rows, V] from the int8 copy for a few bf16 rows, or None (use the bf16 head)."""
    if hidden.dtype != torch.bfloat16 or hidden.dim() != 2 or hidden.shape[0] > INT8_HEAD_MAX_ROWS:
        return None
    tiles = int8_head_copy(head)
    if tiles is None:
        return None
    return cpu_ops().linear_int8(hidden, *tiles, head.weight.shape[0], INT8_HEAD_GROUP, None)
