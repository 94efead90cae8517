"""The whole-layer decode path: each dense decoder layer of a decode-only CPU batch as one kernel
call (ops.decode_layer), with its packed weights gathered once per layer.

It runs the same kernels as the per-op path (Attention, GatedMLP, RMSNorm.add_), in the same
order and roundings, so the tokens are the same; it only removes the Python between them.
Projections are packed bf16 or wint4. Anything else (prefill chunks in the step, MoE layers,
wint8 or float32 weights, more rows than the GEMVs take, no kernels) keeps the per-op path.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from engine.kernels import cpu_ops
from engine.layers.attention import AttentionMetadata
from engine.layers.linear import Linear, fused_silu_applies, gemv_max_rows, packed_copy
from engine.layers.mlp import GatedMLP

_enabled = True


@contextlib.contextmanager
def per_op_path() -> Iterator[None]:
    """Run the per-op path inside the block (the step breakdown times its ops one by one)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def _projection(ops: Any, mod: Any, interleave: bool) -> Any | None:
    """ops.Projection for a plain bf16 Linear (packed) or a wint4 layer (its GEMV tiles)."""
    from engine.layers.quant import WeightOnlyInt4Linear

    if type(mod) is Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.shape[1] % 2 == 0:
        return ops.Projection(w=packed_copy(mod, mod.weight, interleave=interleave), n=mod.weight.shape[0],
                              bias=mod.bias)
    if isinstance(mod, WeightOnlyInt4Linear) and not interleave:
        tiles = mod._gemv_layout()
        if tiles is not None:
            return ops.Projection(w=tiles[0], n=mod.out_features, bias=mod.bias, group=mod.group_size,
                                  scales=tiles[1], zeros=tiles[2])
    return None


def _own(mod: torch.nn.Module, name: str) -> Any:
    """`mod.<name>` read from the module's own dicts. The attribute syntax goes through
    nn.Module.__getattr__, a Python call per lookup, and the cache check below made ~12 of them a
    layer, every layer, every step (~0.5 ms a step)."""
    d = mod.__dict__
    for store in (d["_parameters"], d["_buffers"], d["_modules"]):
        if name in store:
            return store[name]
    return d.get(name)


def _weight_key(mod: torch.nn.Module) -> Any:
    w = _own(mod, "weight")
    return w if w is not None else _own(mod, "weight_int4")


def layer_weights(layer: torch.nn.Module) -> Any | None:
    """ops.DecodeLayerWeights for `layer`, cached on it (rebuilt when a weight or its KV cache is
    replaced); None when the layer cannot take the whole-layer path."""
    attn, mlp = _own(layer, "self_attn"), _own(layer, "mlp")
    if not isinstance(mlp, GatedMLP) or attn.kv_cache is None:
        return None
    mods = (_own(attn, "qkv_proj"), _own(attn, "o_proj"), _own(mlp, "gate_up_proj"), _own(mlp, "down_proj"))
    key = tuple(_weight_key(m) for m in mods) + (attn.kv_cache,)
    cached = layer.__dict__.get("_decode_weights")
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    built = None
    ops = cpu_ops()
    if ops is not None and attn.kv_cache.dtype == torch.bfloat16:
        gu = mlp.gate_up_proj
        fused = type(gu) is Linear and gu.bias is None and fused_silu_applies(gu.weight)
        projs = [_projection(ops, m, interleave=fused and m is gu) for m in mods]
        if all(p is not None for p in projs):
            built = ops.DecodeLayerWeights(
                qkv=projs[0], o=projs[1], gate_up=projs[2], down=projs[3], intermediate=mlp.intermediate_size,
                fused_silu=fused, post_norm=layer.post_attention_layernorm.weight,
                post_eps=layer.post_attention_layernorm.eps,
                q_norm=None if attn.q_norm is None else attn.q_norm.weight,
                k_norm=None if attn.k_norm is None else attn.k_norm.weight,
                qk_eps=0.0 if attn.q_norm is None else attn.q_norm.eps,
                num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, scale=attn.scale, kv_cache=attn.kv_cache)
    layer.__dict__["_decode_weights"] = (key, built)
    return built


def _max_rows(layers: torch.nn.ModuleList) -> int:
    from engine.layers.quant import WeightOnlyInt4Linear, int4_gemv_max_rows

    quantized = isinstance(layers[0].self_attn.qkv_proj, WeightOnlyInt4Linear)
    return min(gemv_max_rows(), int4_gemv_max_rows()) if quantized else gemv_max_rows()


def run_layers(layers: torch.nn.ModuleList, final_norm: torch.nn.Module, rope: Any, x: torch.Tensor,
               h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
    """Every layer through ops.decode_layer, or None (nothing run) where the path does not apply."""
    if not _enabled or meta.prefills or meta.decode_rows is None or x.device.type != "cpu":
        return None
    if h.dtype != torch.bfloat16 or h.shape[0] > _max_rows(layers):
        return None
    ops = cpu_ops()
    if ops is None:
        return None
    weights = [layer_weights(layer) for layer in layers]
    if any(w is None for w in weights):
        return None
    step = ops.DecodeStep(positions=meta.positions, cos=rope.cos, sin=rope.sin, interleaved=rope.interleaved,
                          slot_blocks=meta.slot_blocks, slot_offsets=meta.slot_offsets, rows=meta.decode_rows,
                          block_table=meta.decode_block_table, lens=meta.decode_lens)
    norms = [_own(layer, "input_layernorm") for layer in layers][1:] + [final_norm]
    for w, nxt in zip(weights, norms):
        h = ops.decode_layer(w, step, x, h, _own(nxt, "weight"), nxt.eps, nxt.out_dtype == torch.bfloat16)
    return h
