"""ERNIE-4.5-VL's image encoder: a ViT over 14x14 patches (2D axial rotary, non-causal attention
within each image) and the resampler that merges 2x2 patches (and, for images, a duplicated
temporal pair) into one token of the language model's width.

Images arrive as the image processor lays them out: [patches, channels * 14 * 14] with each 2x2
merge group contiguous, so a merge is a reshape.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.layers.norm import RMSNorm
from engine.models.vision_common import attend_segments, axial_rope_tables, rotate_half_style

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"vision hidden_act {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}") from None


class VisionBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, act: str) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, eps)
        self.norm2 = torch.nn.LayerNorm(dim, eps)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1 = torch.nn.Linear(dim, mlp_dim)
        self.fc2 = torch.nn.Linear(mlp_dim, dim)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).reshape(n, 3, self.heads, -1).unbind(1)  # [n, heads, hd]
        q, k = rotate_half_style(q, cos, sin), rotate_half_style(k, cos, sin)
        x = x + self.proj(attend_segments(q, k, v, lengths))  # each image attends only to itself
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(torch.nn.Module):
    """Patches [N, C*p*p] of one or more images -> features [N, hidden]."""

    skip_quantization = True  # weight-only quantization is for the language model (see quantize_model)

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        dim = int(vc["hidden_size"])
        heads = int(vc.get("num_heads", vc.get("num_attention_heads", 16)))
        patch = int(vc.get("patch_size", 14))
        channels = int(vc.get("in_channels", 3))
        eps = float(vc.get("rms_norm_eps", 1e-6))
        rope = vc.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type {rope.get('rope_type')!r} is not supported (only 'axial')")
        self.merge = int(vc.get("spatial_merge_size", 2))
        self.head_dim = dim // heads
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.patch_embed = torch.nn.Linear(channels * patch * patch, dim, bias=False)
        self.blocks = torch.nn.ModuleList(
            VisionBlock(dim, heads, int(vc.get("intermediate_size", 4 * dim)), eps, vc.get("hidden_act", "quick_gelu"))
            for _ in range(int(vc.get("depth", vc.get("num_hidden_layers", 32))))
        )
        self.ln = torch.nn.LayerNorm(dim, eps)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        cos, sin = (t.to(x.device) for t in axial_rope_tables(grids, self.head_dim, self.theta, self.merge))
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.ln(x)


class _MergeMLP(torch.nn.Module):
    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_dim, out_dim)
        self.fc2 = torch.nn.Linear(out_dim, out_dim)
        self.ln = torch.nn.LayerNorm(out_dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


class Resampler(torch.nn.Module):
    """Vision features [N, vision_hidden] -> language-model tokens [N / 4, text_hidden]."""

    skip_quantization = True  # weight-only quantization is for the language model (see quantize_model)

    def __init__(self, vc: dict[str, Any], text_hidden: int, text_eps: float) -> None:
        super().__init__()
        dim = int(vc["hidden_size"])
        merge = int(vc.get("spatial_merge_size", 2))
        self.temporal = int(vc.get("temporal_merge_size", 2))
        if self.temporal != 2:
            raise ValueError(f"temporal_merge_size {self.temporal} is not supported (only 2)")
        eps = float(vc.get("rms_norm_eps", 1e-6))
        spatial_dim = dim * merge * merge
        self.spatial_dim = spatial_dim
        self.spatial_linear = _MergeMLP(spatial_dim, spatial_dim, eps)
        self.temporal_linear = _MergeMLP(spatial_dim * self.temporal, spatial_dim, eps)
        self.mlp = torch.nn.Linear(spatial_dim, text_hidden)
        self.after_norm = RMSNorm(text_hidden, text_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.spatial_linear(features.reshape(-1, self.spatial_dim))
        # An image is one frame: its temporal pair is the frame twice.
        x = self.temporal_linear(torch.cat((x, x), dim=-1))
        return self.after_norm(self.mlp(x).float())
