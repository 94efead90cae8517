"""Qwen2.5-VL's image encoder: a ViT over 14x14 patches of two frames (2D axial rotary, RMSNorm,
gated SiLU MLPs) whose blocks attend within windows of merge groups, except the
`fullatt_block_indexes` blocks, which attend within each image; then the patch merger (RMSNorm,
2x2 patches concatenated, MLP) to the language model's width.

Images arrive as the image processor lays them out: [patches, channels * 2 * 14 * 14] (a still
image is its patch repeated over the two frames of `temporal_patch_size`), each 2x2 merge group
contiguous. The blocks run on the patches reordered window by window (a window's merge groups
contiguous), so every attention is over contiguous runs; the merger's tokens are put back in the
processor's order at the end.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine.layers.norm import RMSNorm
from engine.models.vision_common import attend_segments, axial_rope_tables, rotate_half_style

_NORM_EPS = 1e-6  # transformers hard-codes it for the vision tower and the merger


def _int(value: Any, name: str) -> int:
    """A size that configs may write as an int or as a square [n, n]."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision {name} {list(value)} is not supported (only square)")
        value = value[0]
    return int(value)


def window_order(grids: Sequence[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The merge groups of `grids` window by window, and each window's length in patches.

    A window is `window` x `window` merge groups of one frame (fewer at the right and bottom
    edges); windows go frame by frame, row-major, and so do the groups inside each."""
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        groups = torch.arange(t * gh * gw).reshape(t, gh, gw) + offset
        for f in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    win = groups[f, r : r + window, c : c + window].flatten()
                    order.append(win)
                    lengths.append(win.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), lengths


class VisionMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)), every projection with a bias (the checkpoint's names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(dim, hidden)
        self.up_proj = torch.nn.Linear(dim, hidden)
        self.down_proj = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, self.heads, -1).unbind(1)  # [n, heads, hd]
        q, k = rotate_half_style(q, cos, sin), rotate_half_style(k, cos, sin)
        return self.proj(attend_segments(q, k, v, lengths))


class VisionBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, _NORM_EPS)
        self.norm2 = RMSNorm(dim, _NORM_EPS)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(torch.nn.Module):
    """Features [N, dim] -> tokens [N / merge^2, out_dim]: each merge group's normed features
    concatenated, then Linear, GELU, Linear (checkpoint names mlp.0 and mlp.2)."""

    def __init__(self, dim: int, out_dim: int, merge: int) -> None:
        super().__init__()
        self.in_dim = dim * merge * merge
        self.ln_q = RMSNorm(dim, _NORM_EPS)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(self.in_dim, self.in_dim), torch.nn.GELU(),
                                       torch.nn.Linear(self.in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.in_dim))


class VisionTransformer(torch.nn.Module):
    """Patches [N, C*T*p*p] of one or more images -> tokens [N / merge^2, out_hidden_size], in
    the processor's order (image by image, merge groups row-major)."""

    skip_quantization = True  # weight-only quantization is for the language model (see quantize_model)

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        dim = int(vc.get("hidden_size", 3584))
        heads = int(vc.get("num_heads", vc.get("num_attention_heads", 16)))
        if dim % heads:
            raise ValueError(f"vision hidden_size {dim} is not a multiple of num_heads {heads}")
        act = vc.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"vision hidden_act {act!r} is not supported (only 'silu')")
        rope = vc.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type {rope.get('rope_type')!r} is not supported (only 'axial')")
        self.patch = _int(vc.get("patch_size", 14), "patch_size")
        self.temporal = _int(vc.get("temporal_patch_size", 2), "temporal_patch_size")
        channels = int(vc.get("in_channels", vc.get("in_chans", 3)))  # the Hub configs: in_chans
        self.merge = int(vc.get("spatial_merge_size", 2))
        window_px = int(vc.get("window_size", 112))
        # The window side in merge groups (transformers: window_size // merge // patch).
        self.window = window_px // self.merge // self.patch
        if self.window < 1:
            raise ValueError(f"vision window_size {window_px} is smaller than one merge group "
                             f"({self.merge * self.patch} pixels)")
        depth = int(vc.get("depth", vc.get("num_hidden_layers", 32)))
        self.full_attention = frozenset(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31)))
        self.head_dim = dim // heads
        self.theta = float(rope.get("rope_theta", 10000.0))
        # A Conv3d whose kernel is its stride over a [C, T, p, p] patch is this matmul.
        self.patch_embed = torch.nn.Linear(channels * self.temporal * self.patch * self.patch, dim, bias=False)
        mlp_dim = int(vc.get("intermediate_size", 3420))
        self.blocks = torch.nn.ModuleList(VisionBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.merger = PatchMerger(dim, int(vc.get("out_hidden_size", 3584)), self.merge)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """`pixels` in the model's dtype (the projections may be quantized: no weight to ask)."""
        if pixels.shape[-1] != self.patch_embed.in_features:
            raise ValueError(f"pixel rows have {pixels.shape[-1]} values, the patch embedding takes "
                             f"{self.patch_embed.in_features}")
        x = self.patch_embed(pixels)
        unit = self.merge * self.merge
        groups, window_lengths = window_order(grids, self.merge, self.window)
        perm = (groups[:, None] * unit + torch.arange(unit)).flatten().to(x.device)
        cos, sin = (t.to(x.device)[perm] for t in axial_rope_tables(grids, self.head_dim, self.theta, self.merge))
        x = x[perm]
        # Full attention is per frame; a frame's patches stay contiguous in window order.
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_lengths if i in self.full_attention else window_lengths)
        tokens = self.merger(x)
        out = torch.empty_like(tokens)
        out[groups.to(x.device)] = tokens  # back to the processor's order
        return out
