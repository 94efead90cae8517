"""ERNIE-4.5 dense and MoE: GPT-J-style (interleaved) rotary, optional biases, top-k MoE layers."""
from __future__ import annotations

from typing import Any

from engine.models.decoder import DecoderForCausalLM, DecoderSpec, MoESpec


class Ernie45ForCausalLM(DecoderForCausalLM):
    def __init__(self, hf: dict[str, Any]) -> None:
        bias = bool(hf.get("use_bias", False))
        hf = {"tie_word_embeddings": True, **hf}
        super().__init__(DecoderSpec.from_hf(hf, interleaved_rope=True, attention_bias=bias, mlp_bias=bias))


def moe_layer_ids(hf: dict[str, Any]) -> frozenset[int]:
    """Which layers are MoE: every `interval`-th layer between start and end (inclusive)."""
    n = int(hf["num_hidden_layers"])
    start = int(hf.get("moe_layer_start_index", 1))
    end = int(hf.get("moe_layer_end_index", -1))
    end = n - 1 if end == -1 else end
    interval = int(hf.get("moe_layer_interval", 1))
    return frozenset(i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end)


class Ernie45MoeForCausalLM(DecoderForCausalLM):
    def __init__(self, hf: dict[str, Any]) -> None:
        bias = bool(hf.get("use_bias", False))
        hf = {"tie_word_embeddings": True, **hf}
        moe = MoESpec(
            num_experts=int(hf.get("moe_num_experts", 64)),
            top_k=int(hf.get("moe_k", 6)),
            intermediate_size=int(hf.get("moe_intermediate_size", 1536)),
            num_shared_experts=int(hf.get("moe_num_shared_experts", 0)),
            norm_min=float(hf.get("moe_norm_min", 1e-12)),
            layer_ids=moe_layer_ids(hf),
        )
        super().__init__(DecoderSpec.from_hf(hf, interleaved_rope=True, attention_bias=bias, mlp_bias=bias, moe=moe))
