"""The whole-layer decode path: each dense decoder layer of a decode-only CPU batch as one kernel
call (ops.decode_layer), with its packed weights gathered once per layer.

It runs the same kernels as the per-op path (Attention, GatedMLP, RMSNorm.add_), in the same
order and roundings, so the tokens are the same; it only removes the Python between them.
Anything else (prefill chunks in the step, MoE layers, quantized or float32 weights, more rows
than the packed linear takes, no kernels) keeps the per-op path.
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


def _plain(mod: Any) -> bool:
    return type(mod) is Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.shape[1] % 2 == 0


def layer_weights(layer: torch.nn.Module) -> Any | None:
    """ops.DecodeLayerWeights for `layer`, cached on it (rebuilt when a weight or its KV cache is
    replaced); None when the layer cannot take the whole-layer path."""
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp, GatedMLP) or attn.kv_cache is None:
        return None
    mods = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    key = tuple(getattr(m, "weight", None) for m in mods) + (attn.kv_cache,)
    cached = layer.__dict__.get("_decode_weights")
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    built = None
    if all(_plain(m) for m in mods) and attn.kv_cache.dtype == torch.bfloat16:
        ops = cpu_ops()
        gu = mlp.gate_up_proj
        fused = gu.bias is None and fused_silu_applies(gu.weight)
        packed = [packed_copy(m, m.weight, interleave=fused and m is gu) for m in mods]
        built = ops.DecodeLayerWeights(
            w_qkv=packed[0], n_qkv=attn.qkv_proj.weight.shape[0], b_qkv=attn.qkv_proj.bias,
            w_o=packed[1], n_o=attn.o_proj.weight.shape[0], b_o=attn.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight, post_eps=layer.post_attention_layernorm.eps,
            w_gate_up=packed[2], intermediate=mlp.intermediate_size, fused_silu=fused, b_gate_up=gu.bias,
            w_down=packed[3], n_down=mlp.down_proj.weight.shape[0], b_down=mlp.down_proj.bias,
            q_norm=None if attn.q_norm is None else attn.q_norm.weight,
            k_norm=None if attn.k_norm is None else attn.k_norm.weight,
            qk_eps=0.0 if attn.q_norm is None else attn.q_norm.eps,
            num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, scale=attn.scale, kv_cache=attn.kv_cache)
    layer.__dict__["_decode_weights"] = (key, built)
    return built


def run_layers(layers: torch.nn.ModuleList, final_norm: torch.nn.Module, rope: Any, x: torch.Tensor,
               h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
    """Every layer through ops.decode_layer, or None (nothing run) where the path does not apply."""
    if not _enabled or meta.prefills or meta.decode_rows is None or x.device.type != "cpu":
        return None
    if h.dtype != torch.bfloat16 or h.shape[0] > gemv_max_rows():
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
    last = len(layers) - 1
    for i, w in enumerate(weights):
        nxt = layers[i + 1].input_layernorm if i < last else final_norm
        h = ops.decode_layer(w, step, x, h, nxt.weight, nxt.eps, nxt.out_dtype == torch.bfloat16)
    return h
