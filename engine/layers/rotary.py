"""Rotary position embeddings: NeoX (half-split, Llama) and GPT-J (interleaved, ERNIE-4.5) styles,
and the multimodal 3D variant (ERNIE-4.5-VL, Qwen2.5-VL) whose frequency pairs each follow one of
the temporal, height and width axes of a token's position."""
from __future__ import annotations

from typing import Any

import torch


def rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta") or hf.get("rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "mrope":  # Qwen2-VL's older configs: the default frequencies, split in sections
        rope_type = "default"
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
        return table_rows(self.cos, self.sin, positions)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; computed in float32, returned in x's dtype."""
        return rotate(x, cos, sin, self.interleaved)


def table_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [T, 1, D] so it broadcasts over heads.
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = x.float()
    if interleaved:
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = xf.roll(x.shape[-1] // 2, dims=-1)
    return (xf * cos + swapped * sin).to(x.dtype)


class StepRope:
    """Rotary tables with one row per token of a step (multimodal positions): used in place of the
    model's table with positions 0..T-1, by the kernels and the torch path alike."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
        self.cos, self.sin, self.interleaved = cos, sin, interleaved

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return table_rows(self.cos, self.sin, positions)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin, self.interleaved)


def mrope_section(hf: dict[str, Any], default: tuple[int, int, int]) -> tuple[int, int, int]:
    """The 3D rotary's `mrope_section` (rope_parameters, or the older rope_scaling), else `default`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    section = params.get("mrope_section", default)
    if len(section) != 3:
        raise ValueError(f"mrope_section must have 3 entries, got {list(section)}")
    return tuple(int(s) for s in section)  # type: ignore[return-value]


# How a 3D rotary assigns its head_dim/2 frequency pairs to the (temporal, height, width) axes.
# "alternating_hw" (ERNIE-4.5-VL, GPT-J-style pairs): section (h, w, t); the first h + w pairs
# alternate height (even) and width (odd), the last t follow time.
# "chunked_thw" (Qwen2-VL, Qwen2.5-VL, NeoX-style halves): section (t, h, w); contiguous runs of
# t, then h, then w pairs.
MROPE_LAYOUTS = ("alternating_hw", "chunked_thw")


class MRotaryEmbedding(RotaryEmbedding):
    """3D rotary: each frequency pair follows one axis of a token's (temporal, height, width)
    position, by `layout` (MROPE_LAYOUTS). A text token has the same position on every axis, so
    the model's plain table serves it."""

    def __init__(self, head_dim: int, max_position: int, theta: float, section: tuple[int, int, int],
                 layout: str = "alternating_hw") -> None:
        pairs = head_dim // 2
        if layout == "alternating_hw":
            h, w, t = section
            if h != w or h + w + t != pairs:
                raise ValueError(f"mrope_section {list(section)} does not fit head_dim {head_dim} "
                                 f"(needs h == w and h + w + t == head_dim / 2)")
            axes = [1 + (j % 2) if j < h + w else 0 for j in range(pairs)]
        elif layout == "chunked_thw":
            if sum(section) != pairs or min(section) < 0:
                raise ValueError(f"mrope_section {list(section)} does not fit head_dim {head_dim} "
                                 f"(needs t + h + w == head_dim / 2)")
            axes = [axis for axis, n in enumerate(section) for _ in range(n)]
        else:
            raise ValueError(f"mrope layout {layout!r} is not one of {MROPE_LAYOUTS}")
        super().__init__(head_dim, max_position, theta, interleaved=layout == "alternating_hw")
        self.section, self.layout = section, layout
        self.pair_axes = axes  # a list, not a buffer: the model is built on the meta device

    def step_rope(self, positions3: torch.Tensor) -> StepRope:
        """Tables for tokens at positions [3, T] (temporal, height, width)."""
        with torch.device("cpu"):
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
            axis = torch.tensor(self.pair_axes)
        pos = positions3.to("cpu").float()  # [3, T]
        angles = pos[axis].transpose(0, 1) * inv_freq  # [T, pairs]: each pair's own axis
        cos, sin = angles.cos(), angles.sin()
        dev = self.cos.device
        if self.interleaved:
            return StepRope(torch.stack((cos, cos), dim=-1).flatten(-2).to(dev),
                            torch.stack((-sin, sin), dim=-1).flatten(-2).to(dev), True)
        return StepRope(torch.cat((cos, cos), dim=-1).to(dev), torch.cat((-sin, sin), dim=-1).to(dev), False)
