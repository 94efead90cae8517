"""ERNIE-4.5-VL (Ernie4_5_VLMoeForConditionalGeneration): the ERNIE-4.5 MoE decoder with
modality-isolated experts and 3D rotary positions, fed image embeddings from its ViT + resampler.

- Placeholder tokens (`image_token_id`, one per merged 2x2 patch group) are replaced by the
  encoder's output; the image's start/end markers stay text embeddings.
- Prompt tokens that are placeholders or start/end markers take the vision experts; every other
  token (and every generated one) the text experts (ModalityIsolatedMoE).
- Rotary: text tokens count up on all three axes; an image's tokens sit at (start, start + row,
  start + column) and the text after it resumes at start + max(rows, columns). Decode continues at
  index + delta (MRopePositions).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from engine.models.decoder import DecoderForCausalLM, DecoderSpec, MoESpec
from engine.models.ernie45_vl_vision import Resampler, VisionTransformer
from engine.multimodal.items import MRopePositions, MultiModalItem
from engine.multimodal.positions import image_mrope_positions

_VISION_NAMES = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "patch_embed.proj": "patch_embed"}
_RESAMPLER_NAMES = {".0.": ".fc1.", ".2.": ".fc2.", ".3.": ".ln."}


def moe_layer_ids(hf: dict[str, Any]) -> frozenset[int]:
    n = int(hf["num_hidden_layers"])
    types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    return frozenset(i for i, t in enumerate(types) if t == "sparse")


class Ernie45VLForConditionalGeneration(DecoderForCausalLM):
    """Takes a flattened config: the text config's fields at the top, `vision_config` nested."""

    def __init__(self, hf: dict[str, Any]) -> None:
        bias = bool(hf.get("use_bias", False))
        hf = {"tie_word_embeddings": True, **hf}
        widths = hf.get("moe_intermediate_size") or [1536, 512]
        if isinstance(widths, int):
            widths = [widths, widths]
        moe = MoESpec(
            num_experts=int(hf.get("moe_num_experts", 64)),
            top_k=int(hf.get("moe_k", 6)),
            intermediate_size=int(widths[0]),
            num_shared_experts=int(hf.get("moe_num_shared_experts", 0)),
            norm_min=float(hf.get("moe_norm_min", 1e-12)),
            layer_ids=moe_layer_ids(hf),
            vision_intermediate_size=int(widths[1]),
        )
        rope = hf.get("rope_parameters") or {}
        section = tuple(int(s) for s in rope.get("mrope_section", (22, 22, 20)))
        super().__init__(DecoderSpec.from_hf(hf, interleaved_rope=True, attention_bias=bias, mlp_bias=bias, moe=moe,
                                             mrope_section=section))
        vc = hf.get("vision_config") or {}
        if not vc:
            raise ValueError("an ERNIE-4.5-VL config needs a vision_config")
        self.vision_model = VisionTransformer(vc)
        self.resampler_model = Resampler(vc, self.spec.hidden_size, self.spec.rms_norm_eps)
        self.spatial_merge = self.vision_model.merge
        self.image_token_id = int(hf.get("image_token_id", 100295))
        self.vision_token_ids = frozenset(
            int(hf.get(k, d)) for k, d in (("image_token_id", 100295), ("image_start_token_id", 101304),
                                           ("image_end_token_id", 101305), ("video_token_id", 103367),
                                           ("video_start_token_id", 101306), ("video_end_token_id", 101307))
        )

    # ----- images -----
    def num_image_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * (h // self.spatial_merge) * (w // self.spatial_merge)

    @torch.inference_mode()
    def encode_images(self, pixels: Sequence[torch.Tensor], grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Each image's patches -> its tokens' embeddings [num_image_tokens, hidden] (float32)."""
        dev = self.embed_tokens.weight.device
        features = self.vision_model(torch.cat([p.to(dev) for p in pixels]), list(grids))
        tokens = self.resampler_model(features)
        return list(tokens.split([self.num_image_tokens(g) for g in grids]))

    def mrope_positions(self, num_prompt_tokens: int, items: Sequence[MultiModalItem]) -> MRopePositions:
        """The prompt's 3D rotary positions (transformers' get_rope_index for images)."""
        return image_mrope_positions(num_prompt_tokens, items, self.spatial_merge)

    # ----- weights -----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        text: list[tuple[str, torch.Tensor]] = []
        vision: dict[str, torch.Tensor] = {}
        for name, t in weights:
            short = name.removeprefix("model.")
            if short.startswith(("vision_model.", "resampler_model.")):
                vision[short] = t
            else:
                text.append((name, t))
        super().load_weights(text, dtype)
        params = dict(self.vision_model.named_parameters(prefix="vision_model"))
        params.update(self.resampler_model.named_parameters(prefix="resampler_model"))
        seen: set[str] = set()
        for name, t in vision.items():
            ours = name
            if name.startswith("vision_model."):
                for theirs, mine in _VISION_NAMES.items():
                    ours = ours.replace(f".{theirs}.", f".{mine}.")
            else:
                for theirs, mine in _RESAMPLER_NAMES.items():
                    ours = ours.replace(theirs, mine, 1) if ours.startswith(("resampler_model.spatial_linear",
                                                                              "resampler_model.temporal_linear")) else ours
            param = params.get(ours)
            if param is None:
                raise ValueError(f"checkpoint has weights this model does not use: [{name!r}]")
            if tuple(param.shape) != tuple(t.shape):
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            norm = ours == "resampler_model.after_norm.weight"
            param.data = t.to(device=param.device, dtype=torch.float32 if norm else dtype).contiguous()
            seen.add(ours)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"checkpoint is missing weight {missing[0]!r}")
