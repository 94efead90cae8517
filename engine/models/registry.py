"""Model classes by the `architectures` name found in config.json."""
from __future__ import annotations

from typing import Any, Callable

from engine.models.decoder import DecoderForCausalLM
from engine.models.ernie45 import Ernie45ForCausalLM, Ernie45MoeForCausalLM
from engine.models.ernie45_vl import Ernie45VLForConditionalGeneration
from engine.models.llama import LlamaForCausalLM
from engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from engine.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, Callable[[dict[str, Any]], DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Ernie4_5ForCausalLM": Ernie45ForCausalLM,
    "Ernie4_5_MoeForCausalLM": Ernie45MoeForCausalLM,
    "Ernie4_5_VLMoeForConditionalGeneration": Ernie45VLForConditionalGeneration,
    # transformers keeps the older spelling as a deprecated alias.
    "Ernie4_5_VL_MoeForConditionalGeneration": Ernie45VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def build_model(architecture: str, hf_config: dict[str, Any]) -> DecoderForCausalLM:
    """Instantiate the model class for `architecture`; unknown names list the supported ones."""
    try:
        cls = MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
    return cls(hf_config)
