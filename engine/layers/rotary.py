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
        """(Re)compute the tables on the CPU, e.g. after the module was built on the meta device.

        Tables are stored full width so that rotation is x * cos + swap(x) * sin_signed, where
        swap exchanges the two halves (NeoX) or each pair (GPT-J) and sin_signed carries the
        minus sign of the first member: four elementwise ops per call instead of ten.
        """
        with torch.device("cpu"):
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
            freqs = torch.arange(self.max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()  # [max_pos, head_dim/2]
        if self.interleaved:
            self.cos = torch.stack((cos, cos), dim=-1).flatten(-2)
            self.sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:
            self.cos = torch.cat((cos, cos), dim=-1)
            self.sin = torch.cat((-sin, sin), dim=-1)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, D] so it broadcasts over heads.
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; computed in float32, returned in x's dtype."""
        xf = x.float()
        if self.interleaved:
            swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        else:
            swapped = xf.roll(self.head_dim // 2, dims=-1)
        return (xf * cos + swapped * sin).to(x.dtype)
