"""Qwen3 dense and Qwen3-MoE: NeoX-style rotary, per-head RMSNorm on q and k (before rotary),
an explicit head_dim, no MLP biases; MoE layers with plain softmax top-k routing.

Defaults for fields a config.json leaves out are those of transformers' Qwen3Config /
Qwen3MoeConfig (e.g. norm_topk_prob False, decoder_sparse_step 1, 128 experts of 8).
"""
from __future__ import annotations

from typing import Any

from engine.models.decoder import DecoderForCausalLM, DecoderSpec, MoESpec


def check_supported(hf: dict[str, Any], every_layer_slides: bool) -> None:
    """Reject what this engine does not implement rather than compute something else."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    # transformers applies a window only with use_sliding_window: Qwen3-MoE then on every layer,
    # Qwen3 dense on the layers typed "sliding_attention" (by default those from max_window_layers on).
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if every_layer_slides:
        sliding = n > 0
    elif types is not None:
        sliding = "sliding_attention" in types
    else:
        sliding = n > int(hf.get("max_window_layers", 28))
    if sliding:
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")


def _spec(hf: dict[str, Any], moe: MoESpec | None = None) -> DecoderSpec:
    return DecoderSpec.from_hf(
        hf, attention_bias=bool(hf.get("attention_bias", False)), qk_norm=True, moe=moe,
    )


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, hf: dict[str, Any]) -> None:
        check_supported(hf, every_layer_slides=False)
        super().__init__(_spec(hf))


def num_experts(hf: dict[str, Any]) -> int:
    # Hub configs spell it num_experts; transformers 5's save_pretrained writes the attribute_map
    # target num_local_experts instead.
    n = hf.get("num_experts")
    if n is None:
        n = hf.get("num_local_experts", 128)
    return int(n)


def moe_layer_ids(hf: dict[str, Any]) -> frozenset[int]:
    """Which layers are MoE: transformers' Qwen3MoeDecoderLayer rule."""
    n = int(hf["num_hidden_layers"])
    dense = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1))
    experts = num_experts(hf)
    return frozenset(i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0)


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, hf: dict[str, Any]) -> None:
        check_supported(hf, every_layer_slides=True)
        moe = MoESpec(
            num_experts=num_experts(hf),
            top_k=int(hf.get("num_experts_per_tok", 8)),
            intermediate_size=int(hf.get("moe_intermediate_size", 768)),
            num_shared_experts=0,
            # The reference divides by the plain sum, which is > 0: a clamp at 0 changes nothing.
            norm_min=0.0,
            layer_ids=moe_layer_ids(hf),
            renormalize=bool(hf.get("norm_topk_prob", False)),
        )
        super().__init__(_spec(hf, moe))
