"""Swap a loaded model's linear layers for weight-only quantized ones (wint8 / wint4)."""
from __future__ import annotations

import logging

import torch

from engine.layers.quant import quantize_linear
from engine.layers.quant_head import INT8_HEAD_GROUP, INT8_HEAD_MAX_ROWS, enable_int8_head

logger = logging.getLogger(__name__)

# The LM head shares its weight with the embedding table in tied models, so it keeps its bf16
# weight and gains an int8 copy for small decode batches (engine/layers/quant_head.py); the
# router must stay float32 to pick the same experts as the reference.
_SKIP = {"lm_head"}
# Group 32 measured on the default model (benchmarks/quant_quality.py): +0.0035 nats/token vs
# bf16, against +0.43 with group 128 (64 on 576-wide layers), at the same speed. GGUF Q4 models
# already sit on a 4-bit grid in blocks of 32, which group 32 reproduces almost exactly.
WINT4_GROUP_SIZE = 32


def quantize_model(model: torch.nn.Module, method: str) -> int:
    """Replace every nn.Linear (except the LM head, which gets an int8 copy beside its bf16
    weight) in place; returns how many were replaced.
    Subtrees whose module sets `skip_quantization` (a vision tower: a small share of the weights,
    run once per image, and sensitive to precision; vLLM leaves them unquantized too) stay as
    they are."""
    count = 0

    def walk(module: torch.nn.Module) -> None:
        nonlocal count
        if getattr(module, "skip_quantization", False):
            return
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name not in _SKIP:
                bias = child.bias.data if child.bias is not None else None
                setattr(module, name, quantize_linear(child.weight.data, bias, method, group_size=WINT4_GROUP_SIZE))
                count += 1
            else:
                walk(child)

    walk(model)
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Linear) and enable_int8_head(head):
        logger.info("LM head: int8 copy (group %d) for decode batches of up to %d rows", INT8_HEAD_GROUP,
                    INT8_HEAD_MAX_ROWS)
    return count
