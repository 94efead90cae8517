"""Llama (SmolLM2 and friends): NeoX-style rotary, no biases unless the config asks."""
from __future__ import annotations

from typing import Any

from engine.models.decoder import DecoderForCausalLM, DecoderSpec


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, hf: dict[str, Any]) -> None:
        bias = bool(hf.get("attention_bias", False))
        super().__init__(DecoderSpec.from_hf(hf, attention_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False))))
