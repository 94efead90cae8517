"""Swap a loaded model's linear layers for weight-only quantized ones (wint8 / wint4)."""
from __future__ import annotations

import torch

from engine.layers.quant import quantize_linear

# The LM head shares its weight with the embedding table in tied models; the router must stay
# float32 to pick the same experts as the reference. Neither is quantized.
_SKIP = {"lm_head"}


def quantize_model(model: torch.nn.Module, method: str) -> int:
    """Replace every nn.Linear (except the LM head) in place; returns how many were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name not in _SKIP:
                bias = child.bias.data if child.bias is not None else None
                setattr(module, name, quantize_linear(child.weight.data, bias, method))
                count += 1
    return count
