"""Rotary position embeddings: NeoX (half-split, Llama) and GPT-J (interleaved, ERNIE-4.5) styles."""
from __future__ import annotations

from typing import Any

import torch


def rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta") or hf.get("rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope_type {rope_type!r} is not supported yet (only 'default')")
    return float(theta if theta is not None else 10000.0)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin table indexed by position; applied to q and k in float32."""

    def __init__(self, head_dim: int, max_position: int, theta: float, interleaved: bool = False) -> None:
        super().__init__()
        self.interleaved = interleaved
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables on the CPU, e.g. after the module was built on the meta device."""
        with torch.device("cpu"):
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
            freqs = torch.arange(self.max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = freqs.cos()  # [max_pos, head_dim/2]
        self.sin = freqs.sin()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, D/2] so it broadcasts over heads.
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]."""
        dtype = x.dtype
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(dtype)
