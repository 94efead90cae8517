"""RMSNorm computed in float32 and returned in the weight's (the model's) dtype.

The input may be float32 even when the model runs in bf16: the residual stream is kept in float32
(see DecoderForCausalLM), and this is where it is rounded for the next matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.float32:
            return F.rms_norm(x.float(), x.shape[-1:], w, self.eps)
        return w * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(w.dtype)
