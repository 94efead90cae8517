"""Weight layouts for the kernels: bf16 [N, K] -> [ceil(N/16), K/2, 16, 2] (see linear_packed)."""
from __future__ import annotations

import torch


def pack_bf16(weight: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Tile 16 output rows x 2 inputs per 64 bytes, zero-padded to whole tiles; K must be even.
    `interleave` (a gate_up weight [2I, K], I % 16 == 0) orders the tiles gate 0, up 0, gate 1,
    up 1, ...: the layout of linear_packed_silu, which needs both halves of an output together."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or k % 2:
        raise ValueError(f"pack_bf16 needs a bf16 [N, K] weight with even K, got {weight.dtype} {tuple(weight.shape)}")
    if interleave:
        if n % 32:
            raise ValueError(f"interleaved packing needs a [2I, K] weight with I % 16 == 0, got {tuple(weight.shape)}")
        i = n // 2
        weight = torch.stack([weight[:i].view(i // 16, 16, k), weight[i:].view(i // 16, 16, k)], dim=1).reshape(n, k)
    tiles = (n + 15) // 16
    padded = weight.new_zeros(tiles * 16, k)
    padded[:n] = weight
    return padded.view(tiles, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
