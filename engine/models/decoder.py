"""A pre-norm decoder-only transformer shared by the supported architectures.

Architectures differ in small ways (rotary style, biases, which layers are MoE, weight names);
each model file states those differences and maps checkpoint names onto this module tree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.layer_decode import run_layers
from engine.layers.linear import Linear, float32_copy, small_linear, upcast_for
from engine.layers.mlp import GatedMLP
from engine.layers.moe import ModalityIsolatedMoE, SparseMoE
from engine.layers.norm import RMSNorm
from engine.layers.quant_head import INT8_HEAD_ABS_TOL, int8_head_logits
from engine.layers.rotary import MRotaryEmbedding, RotaryEmbedding, StepRope, rope_theta
from engine.multimodal.items import StepMultiModal


# bf16 keeps 8 significant bits: a rounded logit is off by at most 2^-8 of its size, so two
# logits closer than 2^-7 (relative) may be in either order. Re-score those in float32.
REFINE_REL_TOL = 2.0**-6


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared_experts: int
    norm_min: float
    layer_ids: frozenset[int]
    renormalize: bool = True  # rescale the top-k weights to sum to 1 (Qwen3-MoE: norm_topk_prob)
    # ERNIE-4.5-VL: a second expert set of this width for vision tokens (ModalityIsolatedMoE)
    vision_intermediate_size: int | None = None


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture-specific choices, read from config.json by each model file."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    interleaved_rope: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    moe: MoESpec | None = None
    mrope_section: tuple[int, int, int] | None = None  # 3D multimodal rotary (ERNIE-4.5-VL, Qwen2.5-VL)
    mrope_layout: str = "alternating_hw"  # which pairs follow which axis (rotary.MROPE_LAYOUTS)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "DecoderSpec":
        heads = int(hf["num_attention_heads"])
        fields = dict(
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            vocab_size=int(hf["vocab_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta(hf),
            max_position=int(hf.get("max_position_embeddings") or 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        fields.update(overrides)
        return cls(**fields)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_bias,
                                   qk_norm=spec.qk_norm, eps=spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        moe = spec.moe
        if moe is not None and layer_id in moe.layer_ids and moe.vision_intermediate_size is not None:
            self.mlp: torch.nn.Module = ModalityIsolatedMoE(
                spec.hidden_size, moe.num_experts, moe.top_k, moe.intermediate_size, moe.vision_intermediate_size,
                moe.num_shared_experts, moe.norm_min, spec.mlp_bias,
            )
        elif moe is not None and layer_id in moe.layer_ids:
            self.mlp = SparseMoE(
                spec.hidden_size, moe.num_experts, moe.top_k, moe.intermediate_size, moe.num_shared_experts,
                moe.norm_min, spec.mlp_bias, renormalize=moe.renormalize,
            )
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor, rope: RotaryEmbedding | StepRope, cos: torch.Tensor | None,
                sin: torch.Tensor | None, meta: AttentionMetadata, next_norm: RMSNorm,
                vision_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: the float32 residual stream, updated in place; h: this layer's normed input.
        Returns `next_norm` of the updated stream (the next layer's input, or the final norm)."""
        h = self.post_attention_layernorm.add_(x, self.self_attn(h, rope, cos, sin, meta))
        if getattr(self.mlp, "takes_vision_rows", False):  # modality-isolated MoE (also its EP layer)
            return next_norm.add_(x, self.mlp(h, vision_rows))
        return next_norm.add_(x, self.mlp(h))


class DecoderForCausalLM(torch.nn.Module):
    """Token ids + positions + attention metadata -> hidden states; `compute_logits` for the rows sampled."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = torch.nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = torch.nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.mrope_section is not None:
            self.rope = MRotaryEmbedding(spec.head_dim, spec.max_position, spec.rope_theta, spec.mrope_section,
                                         spec.mrope_layout)
        else:
            self.rope = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope_theta, spec.interleaved_rope)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm: StepMultiModal | None = None) -> torch.Tensor:
        """`mm`: the step's multimodal inputs (image embeddings for placeholder rows, 3D rotary
        positions, the rows that take vision experts), None for a text-only step."""
        # The residual stream stays float32 in every dtype: in bf16 each layer's output is
        # rounded once, not the running sum, which keeps bf16 greedy output close to float32.
        x = self.embed_tokens(input_ids).float()
        rope: RotaryEmbedding | StepRope = self.rope
        vision_rows = None
        if mm is not None:
            if mm.embeds is not None:
                x[mm.embed_rows] = mm.embeds.to(device=x.device, dtype=torch.float32)
            if mm.rope_positions is not None:
                rope = self.rope.step_rope(mm.rope_positions)
                positions = torch.arange(x.shape[0], device=x.device)
                meta = dataclasses.replace(meta, positions=positions)
            vision_rows = mm.vision_rows
        cos = sin = None
        if not (x.device.type == "cpu" and cpu_ops() is not None):
            cos, sin = rope.cos_sin(positions)
        layers = self.layers
        h = layers[0].input_layernorm.add_(x, None)
        fused = run_layers(layers, self.norm, rope, x, h, meta)
        if fused is not None:
            return fused
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h = layer(x, h, rope, cos, sin, meta, nxt, vision_rows)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits. In bf16 the head's output is rounded to 8 bits of mantissa (steps of
        0.125 near a logit of 25), which turns close calls at the top into ties that argmax
        breaks by token id; the top candidates are therefore re-scored in float32."""
        head = self.lm_head.weight
        logits = int8_head_logits(self.lm_head, hidden)  # quantized models, a few rows
        abs_tol = 0.0 if logits is None else INT8_HEAD_ABS_TOL
        if logits is None:
            logits = small_linear(self.lm_head, hidden, head, None)  # a decode batch: the packed GEMV
        if logits is None and upcast_for(hidden, head):
            return F.linear(hidden.float(), float32_copy(self.lm_head, "_weight_fp32", head))
        logits = self.lm_head(hidden) if logits is None else logits
        ops = cpu_ops() if logits.device.type == "cpu" else None
        if ops is not None and logits.dtype == hidden.dtype == head.dtype == torch.bfloat16 and hidden.dim() == 2:
            return ops.refine_logits(logits, hidden, head, REFINE_REL_TOL, abs_tol)  # the same, in one pass a row
        logits = logits.float()
        if hidden.dtype != torch.float32:
            # Candidates: every logit within two bf16 rounding steps of its row's maximum.
            top = logits.max(dim=-1, keepdim=True).values
            rows, cols = torch.nonzero(logits >= top - top.abs() * REFINE_REL_TOL).unbind(1)
            exact = (self.lm_head.weight[cols].float() * hidden[rows].float()).sum(-1)
            logits[rows, cols] = exact
        return logits

    # ----- weights -----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        """Copy checkpoint tensors (transformers' names) into this module tree; missing ones are an error."""
        w = {name.removeprefix("model."): t for name, t in weights}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in w:
                raise ValueError(f"checkpoint is missing weight {name!r}")
            used.add(name)
            return w[name]

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in w else None

        def put(param: torch.nn.Parameter, tensor: torch.Tensor, keep_fp32: bool = False) -> None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
            # Onto the parameter's device (the runner's: built there by to_empty), not left where read.
            param.data = tensor.to(device=param.device, dtype=torch.float32 if keep_fp32 else dtype).contiguous()

        def load_linear(mod: torch.nn.Linear, prefixes: list[str]) -> None:
            put(mod.weight, torch.cat([take(p + ".weight") for p in prefixes]))
            if mod.bias is not None:
                put(mod.bias, torch.cat([take(p + ".bias") for p in prefixes]))

        def load_mlp(mod: GatedMLP, prefix: str) -> None:
            load_linear(mod.gate_up_proj, [prefix + ".gate_proj", prefix + ".up_proj"])
            load_linear(mod.down_proj, [prefix + ".down_proj"])

        def load_norm(mod: RMSNorm, name: str) -> None:
            put(mod.weight, take(name), keep_fp32=True)
            mod.out_dtype = dtype

        put(self.embed_tokens.weight, take("embed_tokens.weight"))
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}"
            load_norm(layer.input_layernorm, p + ".input_layernorm.weight")
            load_norm(layer.post_attention_layernorm, p + ".post_attention_layernorm.weight")
            a = p + ".self_attn"
            load_linear(layer.self_attn.qkv_proj, [a + ".q_proj", a + ".k_proj", a + ".v_proj"])
            load_linear(layer.self_attn.o_proj, [a + ".o_proj"])
            if layer.self_attn.q_norm is not None:
                # float32 weights; out_dtype stays float32 so q/k are rounded once, after rotary.
                put(layer.self_attn.q_norm.weight, take(a + ".q_norm.weight"), keep_fp32=True)
                put(layer.self_attn.k_norm.weight, take(a + ".k_norm.weight"), keep_fp32=True)
            if hasattr(layer.mlp, "load_checkpoint"):  # an expert-parallel layer loads its own share
                layer.mlp.load_checkpoint(take, put, p + ".mlp")
                if getattr(layer.mlp, "shared_experts", None) is not None:
                    load_mlp(layer.mlp.shared_experts, p + ".mlp.shared_experts")
            elif isinstance(layer.mlp, ModalityIsolatedMoE):
                # ERNIE-4.5-VL's checkpoint layout: one expert list, text experts 0..E-1 then vision
                # experts E..2E-1; the routers transposed ([H, E]: gate.weight text, gate.weight_1
                # vision); one correction bias [2, E] (text row, vision row).
                moe = layer.mlp
                m = p + ".mlp"
                bias = take(m + ".moe_statics.e_score_correction_bias").reshape(2, -1)
                n = moe.text_moe.experts.num_experts
                for k, part in enumerate((moe.text_moe, moe.vision_moe)):
                    put(part.gate.weight, take(m + (".gate.weight" if k == 0 else ".gate.weight_1")).t(), keep_fp32=True)
                    put(part.gate.e_score_correction_bias, bias[k], keep_fp32=True)
                    ids = range(k * n, (k + 1) * n)
                    put(part.experts.gate_up, torch.stack([torch.cat([take(f"{m}.experts.{j}.gate_proj.weight"),
                                                                       take(f"{m}.experts.{j}.up_proj.weight")]) for j in ids]))
                    put(part.experts.down, torch.stack([take(f"{m}.experts.{j}.down_proj.weight") for j in ids]))
                if moe.shared_experts is not None:
                    load_mlp(moe.shared_experts, m + ".shared_experts")
            elif isinstance(layer.mlp, SparseMoE):
                moe = layer.mlp
                put(moe.gate.weight, take(p + ".mlp.gate.weight"), keep_fp32=True)
                bias = maybe(p + ".mlp.moe_statics.e_score_correction_bias")
                if bias is None:
                    bias = maybe(p + ".mlp.gate.e_score_correction_bias")
                if bias is None:
                    # No correction bias (Qwen3-MoE): zeros, as the module was built on the meta
                    # device and its memory is otherwise uninitialised.
                    bias = torch.zeros(moe.gate.e_score_correction_bias.shape)
                put(moe.gate.e_score_correction_bias, bias.reshape(-1), keep_fp32=True)
                n = moe.experts.num_experts
                e = p + ".mlp.experts"
                # An expert-parallel rank holds only its own experts (EPExperts.expert_ids).
                ids = list(getattr(moe.experts, "expert_ids", range(n)))
                if f"{e}.gate_up_proj" in w:
                    # Fused layout (transformers' in-memory Qwen3-MoE experts): gate_up_proj
                    # [E, 2I, H] with gate rows first, down_proj [E, H, I]; the same as ours.
                    put(moe.experts.gate_up, take(f"{e}.gate_up_proj")[ids])
                    put(moe.experts.down, take(f"{e}.down_proj")[ids])
                else:
                    put(moe.experts.gate_up, torch.stack([torch.cat([take(f"{e}.{j}.gate_proj.weight"), take(f"{e}.{j}.up_proj.weight")]) for j in ids]))
                    put(moe.experts.down, torch.stack([take(f"{e}.{j}.down_proj.weight") for j in ids]))
                if moe.shared_experts is not None:
                    load_mlp(moe.shared_experts, p + ".mlp.shared_experts")
            else:
                load_mlp(layer.mlp, p + ".mlp")
        load_norm(self.norm, "norm.weight")
        head = w.get("lm_head.weight")
        if self.spec.tie_word_embeddings or head is None:
            self.lm_head.weight = self.embed_tokens.weight
            used.add("lm_head.weight")
        else:
            put(self.lm_head.weight, take("lm_head.weight"))
        # Buffers that are not parameters (rope tables) stay float32 on purpose.
        unused = sorted(set(w) - used - {"lm_head.weight"})
        if unused:
            raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
