"""Attention over the paged KV cache.

The cache of one layer is a tensor [num_blocks, 2, block_size, kv_heads, head_dim]: block id b
names the same bytes on every layer, which is what makes export/import by block id possible.
New keys/values are written to their slots first; then decode tokens (one query each) are
attended in one batched call, and each prefill chunk in its own call.

With the CPU kernels (engine/kernels) rotary and the KV write are one in-place pass over the
fused qkv projection, and decode queries read their blocks where they lie in the cache; without
them, torch ops do the same with a gathered copy of each sequence's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.layers.linear import Linear, cpu_has_native_bf16
from engine.layers.norm import RMSNorm


@dataclass(frozen=True)
class PrefillSegment:
    start: int  # first row of this request's tokens in the flat batch
    end: int
    context_len: int  # tokens of KV after this step (cached + computed + new)
    block_table: torch.Tensor  # [num_blocks_for_context] long


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each new token's KV goes and which blocks each query reads. Built once per step."""

    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset inside the block
    decode_rows: torch.Tensor | None  # [B] rows of the single-token queries
    decode_block_table: torch.Tensor | None  # [B, max_blocks], padded with block 0
    decode_lens: torch.Tensor | None  # [B] context length of each decode query
    prefills: tuple[PrefillSegment, ...]
    positions: torch.Tensor  # [T] position of each new token


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    # Advanced indices around a slice: the indexed view is [T, 2, kv_heads, head_dim].
    kv_cache[meta.slot_blocks, :, meta.slot_offsets] = torch.stack((k, v), dim=1)


def _gather(kv_cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks -> [..., kv_heads, tokens, head_dim] keys and values in `dtype`.

    Indexing the K (or V) view of the cache yields a contiguous copy whose (blocks, block_size)
    dimensions flatten for free; the upcast, when asked for, is the only other copy.
    """
    out = []
    for half in (0, 1):
        blocks = kv_cache.select(1, half)[block_table]  # [..., nb, bs, kvh, hd]
        x = blocks.flatten(-4, -3).to(dtype)  # [..., L, kvh, hd]
        out.append(x.transpose(-3, -2))
    return out[0], out[1]


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 attention math runs in float32 on CPUs without bf16 units (about 4x faster there)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return dtype


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, seg: PrefillSegment,
                       scale: float, dt: torch.dtype, gqa: bool) -> torch.Tensor:
    """One prefill chunk's queries [n, H, D] against its context -> [n, H, D] in dtype `dt`."""
    n = seg.end - seg.start
    qs = q[seg.start : seg.end].transpose(0, 1).unsqueeze(0).to(dt)  # [1, H, n, D]
    if seg.context_len == n:
        # Whole prompt computed in this step: attend to the fresh k/v, plain causal mask.
        ks = k[seg.start : seg.end].transpose(0, 1).unsqueeze(0).to(dt)
        vs = v[seg.start : seg.end].transpose(0, 1).unsqueeze(0).to(dt)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        ks, vs = _gather(kv_cache, seg.block_table, dt)  # [KVH, L_padded, D]
        ks = ks[:, : seg.context_len].unsqueeze(0)
        vs = vs[:, : seg.context_len].unsqueeze(0)
        # Query i sits at position context_len - n + i and sees keys up to that position.
        q_pos = torch.arange(seg.context_len - n, seg.context_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seg.context_len, device=q.device).unsqueeze(0) <= q_pos
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.squeeze(0).transpose(0, 1)


def _decode_mask(meta: AttentionMetadata, width: int) -> torch.Tensor | None:
    """[B, 1, 1, width] bool, True where a decode query's context has a token; None if none is padded."""
    lens = meta.decode_lens
    if bool((lens == width).all()):
        return None
    return (torch.arange(width, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D] for the new tokens. Returns [T, H*D] in q's dtype."""
    write_kv(kv_cache, k, v, meta)
    T, H, D = q.shape
    gqa = H != k.shape[1]
    dt = attention_dtype(q.dtype, q.device)
    if meta.decode_rows is not None and not meta.prefills:
        # Decode-only step (the common case): every row is a single-token query.
        kd, vd = _gather(kv_cache, meta.decode_block_table, dt)  # [B, KVH, L, D]
        mask = _decode_mask(meta, kd.shape[2])
        od = F.scaled_dot_product_attention(q.to(dt).unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return od.reshape(T, H * D).to(q.dtype)
    out = q.new_empty(T, H, D)
    if meta.decode_rows is not None:
        kd, vd = _gather(kv_cache, meta.decode_block_table, dt)
        qd = q[meta.decode_rows].to(dt).unsqueeze(2)  # [B, H, 1, D]
        mask = _decode_mask(meta, kd.shape[2])
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[meta.decode_rows] = od.squeeze(2).to(q.dtype)
    for seg in meta.prefills:
        out[seg.start : seg.end] = _prefill_attention(q, k, v, kv_cache, seg, scale, dt, gqa).to(q.dtype)
    return out.reshape(T, H * D)


def _prefill_kernel_applies(ops, qkv: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """The prefill kernel's domain: AMX or AVX-512 BF16, bf16, head_dim a multiple of 32 (<= 256),
    16-token blocks."""
    return (ops.isa() in ("amx_bf16", "avx512_bf16") and qkv.dtype == torch.bfloat16 and kv_cache.shape[-1] % 32 == 0
            and kv_cache.shape[-1] <= 256 and kv_cache.shape[2] % 16 == 0)


def paged_attention_fused(ops, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, kv_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for qkv [T, (H + 2 KVH) * D] whose q and k are already rotated and whose k/v are
    already in the cache (ops.rope_write_kv): decode rows read the cache in place, and so do prefill
    chunks on AMX and AVX-512 BF16 hosts (elsewhere they use SDPA). Returns [T, H*D] in qkv's dtype."""
    T = qkv.shape[0]
    D = kv_cache.shape[-1]
    out = qkv.new_empty(T, num_heads * D)
    if meta.decode_rows is not None:
        ops.paged_decode_attention(qkv, meta.decode_rows, kv_cache, meta.decode_block_table, meta.decode_lens,
                                   num_heads, scale, out)
    if meta.prefills and _prefill_kernel_applies(ops, qkv, kv_cache):
        segs = meta.prefills
        ops.paged_prefill_attention(qkv, [s.start for s in segs], [s.end for s in segs],
                                    [s.context_len for s in segs], [s.block_table for s in segs], kv_cache,
                                    num_heads, scale, out)
    elif meta.prefills:
        hkv = qkv.view(T, num_heads + 2 * num_kv_heads, D)
        q, k, v = hkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        dt = attention_dtype(qkv.dtype, qkv.device)
        gqa = num_heads != num_kv_heads
        o3 = out.view(T, num_heads, D)
        for seg in meta.prefills:
            o3[seg.start : seg.end] = _prefill_attention(q, k, v, kv_cache, seg, scale, dt, gqa).to(qkv.dtype)
    return out


class Attention(torch.nn.Module):
    """Self-attention block: fused qkv projection, rotary, paged attention, output projection.

    With `qk_norm` (Qwen3), each query and key head is RMS-normalised over head_dim (q_norm,
    k_norm: one weight [head_dim] each, shared by the heads) before rotary.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        qk_norm: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=bias)
        # The norms' outputs stay float32 (out_dtype is left at float32 by the loader): rotary
        # runs in float32 anyway, so q and k are rounded to the model dtype once, after it.
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner

    def forward(self, x: torch.Tensor, rope, cos: torch.Tensor | None, sin: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """cos/sin: the rotary tables at meta.positions, None when the kernels apply rotary."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        ops = cpu_ops() if qkv.device.type == "cpu" else None
        if ops is not None:
            qn = None if self.q_norm is None else self.q_norm.weight
            kn = None if self.k_norm is None else self.k_norm.weight
            eps = 0.0 if self.q_norm is None else self.q_norm.eps
            ops.rope_write_kv(qkv, meta.positions, rope.cos, rope.sin, rope.interleaved, self.num_heads,
                              self.num_kv_heads, self.kv_cache, meta.slot_blocks, meta.slot_offsets, qn, kn, eps)
            o = paged_attention_fused(ops, qkv, self.num_heads, self.num_kv_heads, self.kv_cache, meta, self.scale)
            return self.o_proj(o)
        qkv = qkv.view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        if self.q_norm is not None:
            normed = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])), dim=1)
            qk = rope.apply(normed, cos, sin).to(qkv.dtype)
        else:
            # Rotate q and k in one call: they are adjacent heads of the fused projection.
            qk = rope.apply(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        o = paged_attention(q, k, v, self.kv_cache, meta, self.scale)
        return self.o_proj(o)
