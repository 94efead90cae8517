"""Gated SiLU MLP with gate and up projections fused into one matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.layers.linear import Linear, gate_up_silu


def silu_and_mul(gate_up: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """silu(gate) * up for [T, 2I] (gate first); one fused pass with the CPU kernels."""
    if gate_up.device.type == "cpu" and gate_up.dim() == 2 and gate_up.dtype in (torch.float32, torch.bfloat16):
        ops = cpu_ops()
        if ops is not None:
            return ops.silu_mul(gate_up)
    gate, up = gate_up.split(intermediate_size, dim=-1)
    return F.silu(gate) * up


class GatedMLP(torch.nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.gate_up_proj
        if type(proj) is Linear and proj.bias is None:  # not once quantized (WeightOnlyLinear)
            h = gate_up_silu(proj, x, proj.weight)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.intermediate_size))
