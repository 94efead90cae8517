"""Mixture-of-experts block: top-k softmax routing (ERNIE-4.5 and Qwen3-MoE gating), routed and
shared experts.

Routing follows transformers' Ernie4_5_Moe and Qwen3Moe exactly: float32 router logits, softmax
over all experts, top-k chosen on the probabilities plus a per-expert correction bias (ERNIE; zero
when the checkpoint has none), the chosen (unbiased) probabilities renormalised by
max(sum, norm_min) when `renormalize` (always for ERNIE; Qwen3-MoE's `norm_topk_prob`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers.linear import float32_copy, upcast_for
from engine.layers.mlp import GatedMLP


class TopKRouter(torch.nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_min: float, renormalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_min = norm_min
        self.renormalize = renormalize
        # Kept in float32 whatever the model dtype, as the reference does.
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights [T, k] in x.dtype, expert ids [T, k])."""
        logits = F.linear(x.float(), self.weight)
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        _, ids = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        weights = probs.gather(-1, ids)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return weights.to(x.dtype), ids


def expert_ffn(experts: torch.nn.Module, slot: int, x: torch.Tensor) -> torch.Tensor:
    """One routed expert's SwiGLU on rows `x`: `experts` holds stacked gate_up [n, 2I, H] and
    down [n, H, I] weights (all experts, or an expert-parallel rank's share) and `slot` picks one."""
    w1, w2 = experts.gate_up[slot], experts.down[slot]
    if upcast_for(x, w1):
        w1 = float32_copy(experts, "_gate_up_fp32", experts.gate_up)[slot]
        w2 = float32_copy(experts, "_down_fp32", experts.down)[slot]
        gate, up = F.linear(x.float(), w1).split(experts.intermediate_size, dim=-1)
        return F.linear(F.silu(gate) * up, w2).to(x.dtype)
    gate, up = F.linear(x, w1).split(experts.intermediate_size, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


class Experts(torch.nn.Module):
    """The routed experts' weights stacked: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up = torch.nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.down = torch.nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size), requires_grad=False)
        # Explicitly on the CPU: the module is built under torch.device("meta").
        self.last_expert_counts = torch.zeros(num_experts, dtype=torch.int64, device="cpu")
        self.total_expert_counts = torch.zeros(num_experts, dtype=torch.int64, device="cpu")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        self.last_expert_counts = counts.cpu()
        self.total_expert_counts += self.last_expert_counts
        token_of = order // k  # which token each sorted slot belongs to
        slot_weight = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            rows = token_of[start : start + n]
            y = expert_ffn(self, e, x[rows])
            y = y * slot_weight[start : start + n, None]
            out.index_add_(0, rows, y)
            start += n
        return out


class SparseMoE(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        moe_intermediate_size: int,
        num_shared_experts: int,
        norm_min: float,
        bias: bool = False,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_min, renormalize)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = (
            GatedMLP(hidden_size, moe_intermediate_size * num_shared_experts, bias=bias) if num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class ModalityIsolatedMoE(torch.nn.Module):
    """ERNIE-4.5-VL's MoE block: text tokens go to the text experts and vision tokens (an image's
    placeholders and its start/end markers, in the prompt) to the vision experts, each set with
    its own router, correction bias and expert width; the shared experts see every token."""

    takes_vision_rows = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, text_intermediate_size: int,
                 vision_intermediate_size: int, num_shared_experts: int, norm_min: float, bias: bool = False) -> None:
        super().__init__()
        self.text_moe = SparseMoE(hidden_size, num_experts, top_k, text_intermediate_size, 0, norm_min, bias)
        self.vision_moe = SparseMoE(hidden_size, num_experts, top_k, vision_intermediate_size, 0, norm_min, bias)
        self.shared_experts = (
            GatedMLP(hidden_size, text_intermediate_size * num_shared_experts, bias=bias) if num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, vision_rows: torch.Tensor | None = None) -> torch.Tensor:
        """vision_rows: [T] bool, True for the rows that take the vision experts (None: none do)."""
        if vision_rows is None or not bool(vision_rows.any()):
            out = self.text_moe(x)
        else:
            out = torch.empty_like(x)
            text_rows = ~vision_rows
            if bool(text_rows.any()):
                out[text_rows] = self.text_moe(x[text_rows])
            out[vision_rows] = self.vision_moe(x[vision_rows])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def padded_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert as (gate_up [2*width, H], down [H, width]), zero-padded from its own width
    (experts of two widths in one stacked tensor): the padded units compute silu(0) * 0 = 0 and
    meet zero columns of down."""
    own = gate.shape[0]
    if own > width:
        raise ValueError(f"expert width {own} is over the layer's {width}")
    if own == width:
        return torch.cat([gate, up]), down
    rows = lambda t: torch.cat([t, t.new_zeros(width - own, t.shape[1])])  # noqa: E731
    return torch.cat([rows(gate), rows(up)]), torch.cat([down, down.new_zeros(down.shape[0], width - own)], dim=1)


def moe_layers(model: torch.nn.Module) -> list[SparseMoE]:
    """The model's MoE blocks in layer order (empty for a dense model); a modality-isolated layer
    counts as two, its text then its vision experts."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def expert_counts(model: torch.nn.Module, total: bool = False) -> list[torch.Tensor]:
    """Per MoE layer, tokens routed to each (global) expert in the last forward, or since load."""
    return [m.experts.total_expert_counts if total else m.experts.last_expert_counts for m in moe_layers(model)]
