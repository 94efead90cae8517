"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): a Qwen2 dense decoder (biases on q, k and v,
none on o_proj; NeoX rotary split into 3D sections) fed image embeddings by its windowed ViT and
patch merger (qwen2_5_vl_vision).

- Placeholder tokens (`image_token_id`, one per merged 2x2 patch group) are replaced by the
  encoder's output; the vision start/end markers stay text embeddings.
- Rotary: `mrope_section` (t, h, w) splits the head_dim/2 frequency pairs into contiguous runs for
  the temporal, height and width axes ("chunked_thw"); positions follow get_rope_index
  (engine.multimodal.positions), the rule ERNIE-4.5-VL uses too.
- Dense: no vision experts, so no token is routed by modality.

Checkpoint names: the Hub layout (model.layers.*, visual.*, lm_head) or transformers' in-memory
one (model.language_model.*, model.visual.*); both load.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import mrope_section
from engine.models.decoder import DecoderForCausalLM, DecoderSpec
from engine.models.qwen2_5_vl_vision import VisionTransformer
from engine.models.qwen3 import check_supported
from engine.multimodal.items import MRopePositions, MultiModalItem
from engine.multimodal.positions import image_mrope_positions

# transformers' Qwen2_5_VLTextConfig defaults, for fields a config.json leaves out.
_TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768}


def _spec(hf: dict[str, Any]) -> DecoderSpec:
    check_supported(hf, every_layer_slides=False)  # hidden_act; sliding windows as Qwen3 dense lays them out
    hf = {**_TEXT_DEFAULTS, **hf}
    heads = int(hf["num_attention_heads"])
    # Qwen2's attention takes head_dim = hidden_size / heads whatever else the config says; the
    # engine's KV cache is sized by the config's head_dim, so the two must agree.
    head_dim = int(hf["hidden_size"]) // heads
    if hf.get("head_dim") not in (None, head_dim):
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({head_dim})")
    section = mrope_section(hf, (16, 24, 24))
    return DecoderSpec.from_hf(hf, head_dim=head_dim, attention_bias=True, mrope_section=section,
                               mrope_layout="chunked_thw")


class Qwen2_5_VLForConditionalGeneration(DecoderForCausalLM):
    """Takes a flattened config: the text config's fields at the top, `vision_config` nested."""

    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__(_spec(hf))
        spec = self.spec
        for layer in self.layers:
            # Qwen2: q, k and v have biases, o_proj has none (the shared block ties the two).
            layer.self_attn.o_proj = Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)
        vc = hf.get("vision_config") or {}
        if not vc:
            raise ValueError("a Qwen2.5-VL config needs a vision_config")
        out = int(vc.get("out_hidden_size", 3584))
        if out != spec.hidden_size:
            raise ValueError(f"vision out_hidden_size {out} != the language model's hidden_size {spec.hidden_size}")
        self.visual = VisionTransformer(vc)
        self.spatial_merge = self.visual.merge
        self.image_token_id = int(hf.get("image_token_id", 151655))

    # ----- images -----
    def num_image_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * (h // self.spatial_merge) * (w // self.spatial_merge)

    @torch.inference_mode()
    def encode_images(self, pixels: Sequence[torch.Tensor],
                      grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's patches -> its tokens' embeddings [num_image_tokens, hidden] (model dtype)."""
        table = self.embed_tokens.weight  # never quantized: the model's device and dtype
        tokens = self.visual(torch.cat([p.to(table.device) for p in pixels]).to(table.dtype), list(grids))
        return list(tokens.split([self.num_image_tokens(g) for g in grids]))

    def mrope_positions(self, num_prompt_tokens: int, items: Sequence[MultiModalItem]) -> MRopePositions:
        """The prompt's 3D rotary positions (transformers' get_rope_index for images)."""
        return image_mrope_positions(num_prompt_tokens, items, self.spatial_merge)

    # ----- weights -----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        text: list[tuple[str, torch.Tensor]] = []
        vision: dict[str, torch.Tensor] = {}
        for name, t in weights:
            if name.startswith(("visual.", "model.visual.")):
                vision[name.removeprefix("model.")] = t
            else:
                text.append((name.replace("model.language_model.", "model.", 1), t))
        super().load_weights(text, dtype)
        params = dict(self.visual.named_parameters(prefix="visual"))
        seen: set[str] = set()
        for name, t in vision.items():
            ours = name.replace(".patch_embed.proj.", ".patch_embed.", 1)
            param = params.get(ours)
            if param is None:
                raise ValueError(f"checkpoint has weights this model does not use: [{name!r}]")
            if ours == "visual.patch_embed.weight":
                t = t.reshape(t.shape[0], -1)  # the Conv3d kernel [dim, C, T, p, p] as a matmul
            if tuple(param.shape) != tuple(t.shape):
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            norm = ours.endswith(("norm1.weight", "norm2.weight", "ln_q.weight"))
            # Norm weights stay float32 (applied before the one rounding, as in the decoder).
            param.data = t.to(device=param.device, dtype=torch.float32 if norm else dtype).contiguous()
            seen.add(ours)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"checkpoint is missing weight {missing[0]!r}")
        for mod in self.visual.modules():
            if isinstance(mod, RMSNorm):
                mod.out_dtype = dtype
