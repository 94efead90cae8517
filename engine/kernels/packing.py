"""Weight layouts for the kernels: bf16 [N, K] -> [ceil(N/16), K/2, 16, 2] (linear_packed),
group-wise 4-bit weights -> nibble tiles with per-group constants (linear_int4), and group-wise
int8 weights -> the same pair tiles with per-group scales (linear_int8)."""
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


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] in 0..15 and scale/zero [N, K/group] (w = (q - 8) * scale + zero), K and
    group multiples of 8 -> nibble words [T, K/8, 16] int32 (row i of tile t, quad j: bits 4m..4m+3
    hold q[16t+i, 8j+2m], bits 16+4m.. hold q[16t+i, 8j+2m+1]), scales [T, K/group, 16] and zero
    terms (zero - 8 * scale) [T, K/group, 16] float32; T = ceil(N/16), rows past N zero."""
    n, k = q.shape
    if q.dtype != torch.uint8 or k % 8 or scale.shape != zero.shape or scale.shape[0] != n or k % scale.shape[1] \
            or (k // scale.shape[1]) % 8:
        raise ValueError(f"pack_int4 needs uint8 q [N, K % 8 == 0] and scale/zero [N, K/group] with group % 8 == 0, "
                         f"got {tuple(q.shape)}, {tuple(scale.shape)}")
    tiles, groups = (n + 15) // 16, scale.shape[1]
    qp = torch.zeros(tiles * 16, k, dtype=torch.int64)
    qp[:n] = q.long()
    quads = qp.view(tiles * 16, k // 8, 4, 2)  # [row, quad, m, even/odd]
    shifts = torch.arange(4) * 4
    words = (quads[..., 0] << shifts).sum(-1) | ((quads[..., 1] << (shifts + 16)).sum(-1))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits
    nib = words.view(tiles, 16, k // 8).transpose(1, 2).contiguous()
    sc = torch.zeros(tiles * 16, groups)
    zb = torch.zeros(tiles * 16, groups)
    sc[:n] = scale.float()
    zb[:n] = zero.float() - 8.0 * scale.float()

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.view(tiles, 16, groups).transpose(1, 2).contiguous()

    return nib, tile(sc), tile(zb)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [N, K] (K even) and scale [N, K/group] (w = q * scale) -> weight tiles [T, K/2, 32]
    int8 (tile t, pair p: rows 16t..16t+15, each with k = 2p and 2p + 1, as pack_bf16 orders its
    pairs) and scales [T, K/group, 16] float32; T = ceil(N/16), rows past N zero."""
    n, k = q.shape
    if q.dtype != torch.int8 or k % 2 or scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"pack_int8 needs int8 q [N, K % 2 == 0] and scale [N, K/group], "
                         f"got {q.dtype} {tuple(q.shape)}, {tuple(scale.shape)}")
    tiles, groups = (n + 15) // 16, scale.shape[1]
    qp = q.new_zeros(tiles * 16, k)
    qp[:n] = q
    sc = torch.zeros(tiles * 16, groups)
    sc[:n] = scale.float()
    w = qp.view(tiles, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(tiles, k // 2, 32).contiguous()
    return w, sc.view(tiles, 16, groups).transpose(1, 2).contiguous()
