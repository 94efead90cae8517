"""RMSNorm computed in float32 and returned in the weight's (the model's) dtype.

The input may be float32 even when the model runs in bf16: the residual stream is kept in float32
(see DecoderForCausalLM), and this is where it is rounded for the next matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops


class RMSNorm(torch.nn.Module):
    """The weight is kept in float32 and applied before the single rounding to `out_dtype`."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.out_dtype = torch.float32  # set to the model dtype by the weight loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.weight, self.eps).to(self.out_dtype)

    def add_(self, residual: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """`residual += delta` in place (the float32 residual stream), then this norm of it:
        one fused pass with the CPU kernels."""
        if residual.device.type == "cpu" and residual.dim() == 2 and self.out_dtype in (torch.float32, torch.bfloat16):
            ops = cpu_ops()
            if ops is not None:
                return ops.add_rms_norm(residual, delta, self.weight, self.eps, self.out_dtype == torch.bfloat16)
        if delta is not None:
            residual += delta
        return self(residual)
