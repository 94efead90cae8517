"""Pieces the ViT image encoders share (ERNIE-4.5-VL, Qwen2.5-VL): patch positions in the image
processors' merge-group-major order, the 2D axial rotary over them, and non-causal attention
within segments (an image, a frame, a window) of a packed batch of patches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def vision_patch_positions(grid_thw: tuple[int, int, int], merge: int) -> torch.Tensor:
    """[t*h*w, 2] (row, column) of each patch, in the processor's merge-group-major order."""
    t, h, w = grid_thw
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(1, 2).flatten()
    cols = cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack((rows, cols), dim=1).repeat(t, 1)


def axial_rope_tables(grids: Sequence[tuple[int, int, int]], head_dim: int, theta: float,
                      merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for the patches of `grids`: the first quarter of the frequencies
    follows the row, the second the column, and the second half repeats the first (rotate-half)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    pos = torch.cat([vision_patch_positions(g, merge) for g in grids])  # [N, 2]
    freqs = pos[..., None].float() * inv_freq  # [N, 2, hd/4]
    hw = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)
    full = torch.cat((hw, hw), dim=-1)  # [N, hd]
    return full.cos(), full.sin()


def rotate_half_style(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] rotated in float32 by per-row cos/sin [N, hd]; returned in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """q, k, v [N, heads, hd]; each run of `lengths` rows attends only to itself (non-causal).
    Returns [N, heads * hd]."""
    n = q.shape[0]
    outs = []
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
        outs.append(o.transpose(0, 1).reshape(length, -1))
        start += length
    if start != n:
        raise ValueError(f"attention segments cover {start} of {n} patches")
    return torch.cat(outs)
