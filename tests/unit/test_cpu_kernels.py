"""The native CPU kernels against plain torch references, in float32 and bfloat16, on shapes
that hit every tail path (N not a multiple of the 16-row tile, head_dim
not a multiple of 8, query groups above the unrolled sizes, partial last blocks); and the whole
engine with and without them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import SamplingParams
from engine.kernels import cpu_ops, kernels_disabled
from tests.conftest import run_to_completion

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="kernels unavailable here (see the log line); the torch path is tested by the rest of the suite")
DTYPES = [torch.float32, torch.bfloat16]


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: within accumulation-order noise; bf16: within one rounding of the output."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().item() + 1e-6
    rtol, atol = (1e-5, 1e-5 * scale) if dtype == torch.float32 else (2**-7, 2**-8 * scale)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 33, 100])
@pytest.mark.parametrize("n,k", [(16, 2), (37, 64), (40, 48), (130, 576), (33, 1536)])
def test_linear_packed(rows, n, k):
    from engine.kernels.packing import pack_bf16

    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g)
    packed = pack_bf16(w)
    assert packed.shape == ((n + 15) // 16, k // 2, 16, 2)
    close(ops.linear_packed(x, packed, n, bias), x.double() @ w.double().T + bias.double(), torch.bfloat16)
    close(ops.linear_packed(x, packed, n, None), x.double() @ w.double().T, torch.bfloat16)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.linear_packed(x, packed, n + 16, None)
    with pytest.raises(ValueError, match="even K"):
        pack_bf16(torch.randn(4, 3).bfloat16())


@pytest.mark.parametrize("rows", [1, 9, 33, 100])
@pytest.mark.parametrize("i,k", [(16, 32), (48, 64), (96, 576)])
def test_linear_packed_silu(rows, i, k):
    """gate_up and SiLU-and-mul in one AMX kernel over the interleaved layout; elsewhere the op
    refuses clearly (the engine only calls it where the kernel ISA is amx_bf16)."""
    from engine.kernels.packing import pack_bf16

    g = torch.Generator().manual_seed(rows * 100 + i + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(2 * i, k, generator=g) / k**0.5).bfloat16()
    packed = pack_bf16(w, interleave=True)
    if ops.isa() != "amx_bf16":
        with pytest.raises(RuntimeError, match="needs AMX"):
            ops.linear_packed_silu(x, packed, i)
        return
    gate_up = x.double() @ w.double().T
    ref = F.silu(gate_up[:, :i]) * gate_up[:, i:]
    close(ops.linear_packed_silu(x, packed, i), ref, torch.bfloat16)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.linear_packed_silu(x, packed, i + 16)
    with pytest.raises(ValueError, match="I % 16"):
        pack_bf16(torch.randn(48, k).bfloat16(), interleave=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (37, 64, 32), (130, 576, 64), (33, 256, 128)])
def test_linear_int4(dtype, rows, n, k, group):
    """The 4-bit GEMV against x @ dequantized(w) in float64: float32 within accumulation noise,
    bf16 within one rounding of the output."""
    from engine.kernels.packing import pack_int4

    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    zero = torch.randn(n, k // group, generator=g) * 0.01
    w = (q.double() - 8) * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    nib, sc, zb = pack_int4(q, scale, zero)
    out = ops.linear_int4(x, nib, sc, zb, n, group, bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    close(out, x.double() @ w.T + bias.double(), dtype)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.linear_int4(x, nib, sc, zb, n + 16, group, None)
    with pytest.raises(RuntimeError, match="group"):
        ops.linear_int4(x, nib, sc, zb, n, 12, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (37, 64, 32), (130, 576, 32), (33, 256, 128), (20, 512, 256)])
def test_linear_int8(dtype, rows, n, k, group):
    """The int8 GEMV against x @ (q * scale) in float64. The activations are rounded to int16 per
    row (2^-16 of the row's largest value), so float32 output agrees to ~1e-4 of the largest
    output; bf16 within one rounding of it."""
    from engine.kernels.packing import pack_int8

    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    w = q.double() * scale.double().repeat_interleave(group, 1)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    tiles, sc = pack_int8(q, scale)
    out = ops.linear_int8(x, tiles, sc, n, group, bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    ref = x.double() @ w.T + bias.double()
    top = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4 * top)
    else:
        close(out, ref, dtype)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.linear_int8(x, tiles, sc, n + 16, group, None)
    with pytest.raises(RuntimeError, match="group"):
        ops.linear_int8(x, tiles, sc, n, 6, None)


def test_linear_int8_extreme_rows():
    """A zero row gives the bias; a row with a NaN or an infinity gives NaN outputs (never the
    garbage of an int16 conversion of NaN); its neighbours are unaffected."""
    from engine.kernels.packing import pack_int8

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(40, 2, generator=g) * 0.02 + 0.001
    x = torch.randn(5, 64, generator=g)
    x[1] = 0
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    bias = torch.randn(40, generator=g)
    out = ops.linear_int8(x, *pack_int8(q, scale), 40, 32, bias)
    assert torch.equal(out[1], bias)
    assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
    ref = x[[0, 4]].double() @ (q.double() * scale.double().repeat_interleave(32, 1)).T + bias.double()
    torch.testing.assert_close(out[[0, 4]].double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("n", [32, 37])  # whole tiles (vector rounding) and a partial one (scalar)
def test_linear_packed_rounds_to_nearest_even_and_keeps_nans(n):
    """K = 2: both products are exact in float32 and their sum is rounded once, so the float32
    result is known exactly and its bf16 rounding must be torch's, bit for bit; a NaN in x stays
    a NaN in its row, an infinity an infinity."""
    from engine.kernels.packing import pack_bf16

    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, 2, generator=g).bfloat16()
    w = torch.randn(n, 2, generator=g).bfloat16()
    x[4, 1] = float("nan")
    x[6, 0] = float("inf")
    ref = (x.float()[:, :1] * w.float()[:, 0] + x.float()[:, 1:] * w.float()[:, 1]).bfloat16()
    out = ops.linear_packed(x, pack_bf16(w), n, None)
    assert torch.isnan(out[4]).all() and not torch.isinf(out[4]).any()
    finite = [r for r in range(9) if r != 4]
    assert torch.equal(out[finite].view(torch.int16), ref[finite].view(torch.int16))


def test_linear_packed_strided_rows_and_bad_input():
    from engine.kernels.packing import pack_bf16

    x = torch.randn(4, 100).bfloat16()[:, :64]  # rows strided, elements contiguous
    w = torch.randn(16, 64).bfloat16()
    close(ops.linear_packed(x, pack_bf16(w), 16, None), x.double() @ w.double().T, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ops.linear_packed(torch.randn(2, 64), pack_bf16(w), 16, None)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h", [(1, 64), (5, 37), (40, 576)])
def test_add_rms_norm(out_dtype, delta_dtype, t, h):
    x = torch.randn(t, h)
    w = torch.rand(h) + 0.5
    delta = None if delta_dtype is None else torch.randn(t, h).to(delta_dtype)
    expect_x = x.double() + (0 if delta is None else delta.double())
    ref = expect_x * torch.rsqrt(expect_x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    out = ops.add_rms_norm(x, delta, w, 1e-6, out_dtype == torch.bfloat16)
    assert out.dtype == out_dtype
    torch.testing.assert_close(x.double(), expect_x, rtol=1e-6, atol=1e-6)  # the residual is updated in place
    close(out, ref, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,i", [(1, 128), (3, 13), (17, 1536)])
def test_silu_mul(dtype, t, i):
    gu = (torch.randn(t, 2 * i) * 4).to(dtype)
    g, u = gu.double().split(i, dim=-1)
    close(ops.silu_mul(gu), F.silu(g) * u, dtype)


def _paged_setup(dtype, heads, kv_heads, head_dim, block_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(blocks_per) + 3
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    pos = 0
    for i, nb in enumerate(blocks_per):
        table[i, :nb] = perm[pos : pos + nb]
        pos += nb
    return cache, table


def _reference_attention(q, cache, table, lens, heads, scale):
    """Per sequence: gather its tokens and run float64 softmax attention with GQA."""
    bs, kvh = cache.shape[2], cache.shape[3]
    outs = []
    for i, n in enumerate(lens):
        blocks = cache[table[i, : (n + bs - 1) // bs]].double()  # [nb, 2, bs, kvh, d]
        k = blocks[:, 0].flatten(0, 1)[:n]  # [n, kvh, d]
        v = blocks[:, 1].flatten(0, 1)[:n]
        k = k.repeat_interleave(heads // kvh, dim=1)
        v = v.repeat_interleave(heads // kvh, dim=1)
        qi = q[i].double()  # [H, D]
        p = torch.softmax(torch.einsum("hd,nhd->hn", qi, k) * scale, dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", p, v).reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 24), (18, 2, 32), (6, 1, 8), (16, 2, 128), (5, 5, 96)])
@pytest.mark.parametrize("nseq", [2, 6])
def test_paged_decode_attention(dtype, heads, kv_heads, head_dim, nseq):
    """Six sequences take the whole-sequence tasks where they apply (bf16 caches), two the
    per-(sequence, kv head) tasks: both against a float64 reference."""
    lens = [1, 7, 16, 17, 40, 129][-nseq:]
    bs = 16
    cache, table = _paged_setup(dtype, heads, kv_heads, head_dim, bs, lens)
    T = len(lens) + 2
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(T, width).to(dtype)
    rows = torch.tensor([0, 2, 3, 4, 6, 7][:nseq])  # decode rows among other (prefill) rows
    out = torch.full((T, heads * head_dim), 7.0, dtype=dtype)
    scale = head_dim**-0.5
    ops.paged_decode_attention(qkv, rows, cache, table, torch.tensor(lens), heads, scale, out)
    q = qkv[rows, : heads * head_dim].view(len(lens), heads, head_dim)
    close(out[rows], _reference_attention(q, cache, table, lens, heads, scale), dtype)
    untouched = [r for r in range(T) if r not in rows.tolist()]
    assert bool((out[untouched] == 7.0).all())


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 24), (16, 2, 128), (7, 7, 32)])
def test_decode_attention_does_not_depend_on_the_batch(heads, kv_heads, head_dim):
    """A batch of six bf16 sequences takes the whole-sequence (block-major) tasks, one sequence
    alone the per-(sequence, kv head) ones: the two paths must give the same bits, or a
    sequence's tokens would change with what it is batched with."""
    lens = [1, 7, 16, 17, 40, 129]
    cache, table = _paged_setup(torch.bfloat16, heads, kv_heads, head_dim, 16, lens)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim).bfloat16()
    scale = head_dim**-0.5
    batched = torch.empty(len(lens), heads * head_dim, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # whole-sequence tasks need >= 2 sequences per thread
    try:
        ops.paged_decode_attention(qkv, torch.arange(len(lens)), cache, table, torch.tensor(lens), heads, scale,
                                   batched)
    finally:
        torch.set_num_threads(threads)
    for i, n in enumerate(lens):
        alone = torch.empty(1, heads * head_dim, dtype=torch.bfloat16)
        ops.paged_decode_attention(qkv[i : i + 1], torch.tensor([0]), cache, table[i : i + 1], torch.tensor([n]),
                                   heads, scale, alone)
        assert torch.equal(alone[0], batched[i]), f"sequence {i} (length {n})"


def test_paged_decode_attention_rejects_bad_tables():
    cache, table = _paged_setup(torch.float32, 4, 2, 16, 16, [20])
    qkv, out = torch.randn(1, 128), torch.empty(1, 64)
    with pytest.raises(RuntimeError, match="context length"):
        ops.paged_decode_attention(qkv, torch.tensor([0]), cache, table, torch.tensor([33]), 4, 0.25, out)
    table[0, 1] = 10_000
    with pytest.raises(RuntimeError, match="block id"):
        ops.paged_decode_attention(qkv, torch.tensor([0]), cache, table, torch.tensor([20]), 4, 0.25, out)


bf16_units = pytest.mark.skipif(ops is None or ops.isa() not in ("amx_bf16", "avx512_bf16"),
                                reason="the prefill attention kernel needs AMX or AVX-512 BF16; AVX2 hosts take "
                                       "SDPA (tested everywhere)")


def _reference_prefill(qkv, cache, table, start, n, context, heads, scale):
    """Causal float64 attention of rows [start, start + n) (the last n of `context` positions)."""
    bs, kvh, d = cache.shape[2], cache.shape[3], cache.shape[4]
    blocks = cache[table[: (context + bs - 1) // bs]].double()
    k = blocks[:, 0].flatten(0, 1)[:context].repeat_interleave(heads // kvh, dim=1)
    v = blocks[:, 1].flatten(0, 1)[:context].repeat_interleave(heads // kvh, dim=1)
    q = qkv[start : start + n, : heads * d].view(n, heads, d).double()
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    hidden = torch.arange(context)[None, :] > torch.arange(context - n, context)[:, None]
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v).reshape(n, heads * d)


@bf16_units
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 64), (4, 2, 256)])
@pytest.mark.parametrize("segments", [[(256, 256)], [(1, 1)], [(17, 17)], [(40, 100)], [(64, 64), (1, 65)],
                                      [(5, 300), (70, 70), (33, 129)]])
def test_paged_prefill_attention(heads, kv_heads, head_dim, segments):
    """(queries, context) per segment: whole prompts, chunks after a cached prefix, tile-sized and
    ragged, several in one call (rows among others that must stay untouched), against float64.
    The cache holds random data past each context: those stale rows must not leak in."""
    bs = 16
    contexts = [c for _, c in segments]
    cache, table = _paged_setup(torch.bfloat16, heads, kv_heads, head_dim, bs, contexts)
    starts, row = [], 1
    for n, _ in segments:
        starts.append(row)
        row += n
    T = row + 1
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).to(torch.bfloat16)
    out = torch.full((T, heads * head_dim), 7.0, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    ends = [s + n for s, (n, _) in zip(starts, segments)]
    ops.paged_prefill_attention(qkv, starts, ends, contexts, list(table), cache, heads, scale, out)
    for i, (n, c) in enumerate(segments):
        ref = _reference_prefill(qkv, cache, table[i], starts[i], n, c, heads, scale)
        close(out[starts[i] : starts[i] + n], ref, torch.bfloat16)
    assert bool((out[0] == 7.0).all()) and bool((out[-1] == 7.0).all())


@bf16_units
def test_paged_prefill_attention_rejects_bad_input():
    cache, table = _paged_setup(torch.bfloat16, 4, 2, 32, 16, [20])
    qkv, out = torch.randn(20, 256).to(torch.bfloat16), torch.empty(20, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="shorter than"):
        ops.paged_prefill_attention(qkv, [0], [20], [10], [table[0]], cache, 4, 0.2, out)
    with pytest.raises(RuntimeError, match="block table too short"):
        ops.paged_prefill_attention(qkv, [0], [20], [40], [table[0]], cache, 4, 0.2, out)
    bad = table[0].clone()
    bad[1] = 10_000
    with pytest.raises(RuntimeError, match="block id"):
        ops.paged_prefill_attention(qkv, [0], [20], [20], [bad], cache, 4, 0.2, out)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ops.paged_prefill_attention(qkv.float(), [0], [20], [20], [table[0]], cache, 4, 0.2, out)


@bf16_units
def test_fused_attention_prefill_kernel_matches_sdpa_branch():
    """paged_attention_fused hands prefill chunks to the kernel on AMX and AVX-512 BF16 hosts: the
    same outputs as its SDPA branch, for a whole prompt and for a chunk after a cached prefix, in
    one step."""
    from engine.layers import attention as attn

    heads, kv_heads, d, bs = 6, 2, 64, 16
    cache, table = _paged_setup(torch.bfloat16, heads, kv_heads, d, bs, [48, 80])
    segs = (attn.PrefillSegment(0, 48, 48, table[0, :3]), attn.PrefillSegment(48, 80, 80, table[1, :5]))
    T = 80
    qkv = torch.randn(T, (heads + 2 * kv_heads) * d).to(torch.bfloat16)
    # The kernel reads k/v from the cache, SDPA (whole prompt) from qkv: make them agree.
    k = qkv.view(T, -1, d)[:, heads : heads + kv_heads]
    v = qkv.view(T, -1, d)[:, heads + kv_heads :]
    for t in range(48):
        cache[table[0, t // bs], 0, t % bs] = k[t]
        cache[table[0, t // bs], 1, t % bs] = v[t]
    meta = attn.AttentionMetadata(slot_blocks=torch.zeros(T, dtype=torch.long), slot_offsets=torch.zeros(T, dtype=torch.long),
                                  decode_rows=None, decode_block_table=None, decode_lens=None, prefills=segs,
                                  positions=torch.arange(T))
    fast = attn.paged_attention_fused(ops, qkv, heads, kv_heads, cache, meta, d**-0.5)
    real = attn._prefill_kernel_applies
    try:
        attn._prefill_kernel_applies = lambda *a: False
        sdpa = attn.paged_attention_fused(ops, qkv, heads, kv_heads, cache, meta, d**-0.5)
    finally:
        attn._prefill_kernel_applies = real
    close(fast, sdpa.double(), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_write_kv(dtype, interleaved, qk_norm):
    from engine.layers.rotary import RotaryEmbedding

    heads, kv_heads, d, bs, T = 4, 2, 16, 8, 11
    rope = RotaryEmbedding(d, 64, 10000.0, interleaved)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * d).to(dtype)
    positions = torch.randint(0, 64, (T,))
    cache = torch.zeros(6, 2, bs, kv_heads, d, dtype=dtype)
    slots = torch.randperm(6 * bs)[:T]
    qn = torch.rand(d) + 0.5 if qk_norm else None
    kn = torch.rand(d) + 0.5 if qk_norm else None
    before = qkv.clone()
    ops.rope_write_kv(qkv, positions, rope.cos, rope.sin, interleaved, heads, kv_heads, cache, slots // bs, slots % bs,
                      qn, kn, 1e-6)
    x = before.double().view(T, heads + 2 * kv_heads, d)
    qk = x[:, : heads + kv_heads]
    if qk_norm:
        w = torch.cat([qn.double().expand(heads, d), kn.double().expand(kv_heads, d)])
        qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    cos, sin = rope.cos[positions].double().unsqueeze(1), rope.sin[positions].double().unsqueeze(1)
    swapped = qk.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) if interleaved else qk.roll(d // 2, dims=-1)
    ref_qk = qk * cos + swapped * sin
    got = qkv.view(T, heads + 2 * kv_heads, d)
    close(got[:, : heads + kv_heads], ref_qk, dtype)
    assert torch.equal(got[:, heads + kv_heads :], before.view(T, -1, d)[:, heads + kv_heads :])  # v untouched
    written_k = cache[slots // bs, 0, slots % bs]
    written_v = cache[slots // bs, 1, slots % bs]
    assert torch.equal(written_k, got[:, heads : heads + kv_heads])
    assert torch.equal(written_v, got[:, heads + kv_heads :])
    with pytest.raises(RuntimeError, match="position"):
        ops.rope_write_kv(qkv, positions + 64, rope.cos, rope.sin, interleaved, heads, kv_heads, cache, slots // bs,
                          slots % bs, qn, kn, 1e-6)


@pytest.mark.parametrize("arch", ["llama", "ernie45", "qwen3"])
def test_engine_same_tokens_with_and_without_kernels(arch, tiny_checkpoint, make_engine):
    """The kernels change how, not what: float32 greedy tokens are identical on both paths,
    for prompts that prefill in chunks, decode in batches and mix both in one step."""
    path = tiny_checkpoint(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 30, 9, 50)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    fast = run_to_completion(make_engine(path, max_num_batched_tokens=24), prompts, params)
    with kernels_disabled():
        plain = run_to_completion(make_engine(path, max_num_batched_tokens=24), prompts, params)
    assert fast == plain


@pytest.mark.parametrize("arch,quant", [("llama", None), ("qwen3", None), ("ernie45_moe", None), ("llama", "wint4"),
                                        ("qwen3", "wint8")])
def test_whole_layer_decode_same_tokens_as_per_op(arch, quant, tiny_checkpoint, make_engine):
    """bf16 decode steps through ops.decode_layer give exactly the per-op path's greedy tokens and
    logprobs (same kernels, same roundings), with prompts that prefill in chunks next to decodes;
    dense bf16 and wint4 layers did take it; MoE layers and wint8 keep the per-op path."""
    from engine.layers.layer_decode import per_op_path

    path = tiny_checkpoint(arch)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 30, 9, 50, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)

    def run(eng):
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params)
        done = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
        return done

    kw = dict(dtype="bfloat16", max_num_batched_tokens=24, quantization=quant)
    fast_engine = make_engine(path, **kw)
    fast = run(fast_engine)
    layers = fast_engine.runner.model.layers
    built = [layer.__dict__.get("_decode_weights", (None, None))[1] for layer in layers]
    with per_op_path():
        plain = run(make_engine(path, **kw))
    assert fast == plain
    if arch == "ernie45_moe" or quant == "wint8":
        assert any(b is None for b in built)
    else:
        assert all(b is not None for b in built)


@pytest.mark.parametrize("quant", [None, "wint4"])
def test_whole_layer_weights_are_rebuilt_when_a_weight_or_the_cache_is_replaced(quant, tiny_checkpoint, make_engine):
    """The per-layer cache of packed weights is reused step after step, and built again when a
    projection's weight (bf16 `weight`, wint4 `weight_int4`) or the layer's KV cache is replaced."""
    from engine.layers.layer_decode import layer_weights

    eng = make_engine(tiny_checkpoint("llama"), dtype="bfloat16", quantization=quant)
    layer = eng.runner.model.layers[0]
    first = layer_weights(layer)
    assert first is not None and layer_weights(layer) is first
    down = layer.mlp.down_proj
    if quant is None:
        down.weight = torch.nn.Parameter(down.weight.detach().clone(), requires_grad=False)
    else:
        down.weight_int4 = down.weight_int4.clone()
    second = layer_weights(layer)
    assert second is not None and second is not first and layer_weights(layer) is second
    layer.self_attn.kv_cache = layer.self_attn.kv_cache.clone()
    assert layer_weights(layer) is not second


def _host_has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return " avx512_bf16" in f.read()


@pytest.mark.parametrize("isa", ["avx2", "avx512_bf16"])
def test_the_lower_tiers_pass_too(isa):
    """The kernels pick their ISA at load; PDSERVE_KERNEL_ISA selects a lower tier's paths, so
    the AVX2 code (what AVX2-only hosts run) and the AVX-512 BF16 GEMV (what hosts without AMX
    run) are checked here on any host that has them."""
    if isa == "avx512_bf16" and not _host_has_avx512_bf16():
        pytest.skip("this CPU has no AVX-512 BF16: that tier cannot run here")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PDSERVE_KERNEL_ISA": isa}
    check = subprocess.run([sys.executable, "-c", "from engine.kernels import cpu_ops; print(cpu_ops().isa())"],
                           cwd=root, env=env, capture_output=True, text=True, check=True)
    assert check.stdout.split()[-1] == isa
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not lower_tiers and not engine_same_tokens and not whole_layer"],
                         cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def _refine_reference(logits, hidden, weight, tol, abs_tol=0.0):
    """decoder.compute_logits' torch expression: widen, find the near-ties, re-score them."""
    out = logits.float()
    top = out.max(dim=-1, keepdim=True).values
    rows, cols = torch.nonzero(out >= top - torch.clamp(top.abs() * tol, min=abs_tol)).unbind(1)
    out[rows, cols] = (weight[cols].double() * hidden[rows].double()).sum(-1).float()
    return out, (rows, cols)


def test_refine_logits_rescores_exactly_the_near_ties():
    """Same candidates as the torch expression, re-scored to the float64 dot product rounded
    once; every other logit only widened. Ties are made on purpose: duplicated weight rows and
    rows nudged by one bf16 step, so the bf16 logits tie or nearly tie at the top."""
    torch.manual_seed(3)
    V, K, tol = 4099, 96, 2.0**-6
    weight = torch.randn(V, K).bfloat16()
    hidden = torch.randn(5, K).bfloat16()
    top = (hidden.float() @ weight.float().T).argmax(-1)
    for b, t in enumerate(top.tolist()):  # near-copies of each row's winner
        for j in range(1, 4):
            weight[(t + 17 * j) % V] = weight[t] * (1 + j * 2.0**-8)
    logits = (hidden.float() @ weight.float().T).bfloat16()
    got = ops.refine_logits(logits, hidden, weight, tol)
    want, (rows, cols) = _refine_reference(logits, hidden, weight, tol)
    assert got.dtype == torch.float32 and got.shape == (5, V)
    assert len(rows) > 5, "the test should make near-ties"
    assert torch.equal(got, want)
    assert torch.equal(got.argmax(-1), (hidden.double() @ weight.double().T).argmax(-1))
    # An absolute floor (the int8 head's error) widens the candidates where it exceeds the relative one.
    wide = ops.refine_logits(logits, hidden, weight, tol, abs_tol=2.0)
    want_wide, (rows_wide, _) = _refine_reference(logits, hidden, weight, tol, abs_tol=2.0)
    assert len(rows_wide) > len(rows) and torch.equal(wide, want_wide)


def test_refine_logits_leaves_a_nan_row_widened():
    weight = torch.randn(64, 32).bfloat16()
    hidden = torch.randn(2, 32).bfloat16()
    logits = (hidden.float() @ weight.float().T).bfloat16()
    logits[1, 5] = float("nan")
    got = ops.refine_logits(logits, hidden, weight, 2.0**-6)
    assert torch.equal(got[1].isnan(), logits[1].float().isnan())
    assert torch.equal(got[1][~got[1].isnan()], logits[1].float()[~got[1].isnan()])
    with pytest.raises(RuntimeError, match="shapes"):
        ops.refine_logits(logits, hidden[:, :16], weight, 2.0**-6)


def test_argmax_rows_answers_as_torch_does():
    """First position of the maximum on ties, the first NaN where there is one, chosen rows only."""
    torch.manual_seed(4)
    logits = torch.randn(6, 1000)
    logits[1, 10] = logits[1, 900] = 50.0  # a tie: the first wins
    logits[2, 0] = 99.0  # position 0
    logits[3, 400] = float("nan")
    logits[3, 700] = float("nan")
    logits[4, :] = float("-inf")
    rows = [5, 1, 2, 3, 4]
    assert ops.argmax_rows(logits, rows) == logits[rows].argmax(-1).tolist()
    assert ops.argmax_rows(logits, []) == []
    with pytest.raises(RuntimeError, match="out of range"):
        ops.argmax_rows(logits, [6])
