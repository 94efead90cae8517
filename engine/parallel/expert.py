"""The expert-parallel MoE forward for one rank, and the helpers that shard a model's experts.

Every rank runs the whole batch through replicated attention, so every rank already holds every
token's hidden state and the (replicated, deterministic) routing. The all-to-all dispatch of the
design is then a no-op: each rank computes its own experts' contributions for the tokens routed
to them, and the combine is a sum over ranks (all_reduce). This is the same math as one rank up
to the order in which the per-expert contributions are summed.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F

from engine.layers.linear import float32_copy, upcast_for
from engine.layers.moe import moe_layers
from engine.parallel.placement import ExpertPlacement

AllReduce = Callable[[torch.Tensor], None]  # sums a tensor in place across the group

_EXPERT_WEIGHT = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.experts\.(\d+)\.")


class EPExperts(torch.nn.Module):
    """This rank's routed experts: gate_up [E_local, 2I, H], down [E_local, H, I], in `expert_ids` order."""

    def __init__(self, expert_ids: tuple[int, ...], num_experts: int, hidden_size: int, intermediate_size: int,
                 all_reduce: AllReduce) -> None:
        super().__init__()
        self.num_experts = num_experts  # global: router ids index the whole set
        self.expert_ids = expert_ids  # the decoder's load_weights reads only these
        self.intermediate_size = intermediate_size
        n = len(expert_ids)
        self.gate_up = torch.nn.Parameter(torch.zeros(n, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.down = torch.nn.Parameter(torch.zeros(n, hidden_size, intermediate_size), requires_grad=False)
        self.all_reduce = all_reduce
        slot = [-1] * num_experts
        for i, e in enumerate(expert_ids):
            slot[e] = i
        self._slot_of = tuple(slot)
        self._slot_cache: dict[torch.device, torch.Tensor] = {}
        # Routing is replicated, so these global counts are the same on every rank.
        # Explicitly on the CPU: the module is built under torch.device("meta").
        self.last_expert_counts = torch.zeros(num_experts, dtype=torch.int64, device="cpu")
        self.total_expert_counts = torch.zeros(num_experts, dtype=torch.int64, device="cpu")

    def _slots(self, device: torch.device) -> torch.Tensor:
        if device not in self._slot_cache:
            self._slot_cache[device] = torch.tensor(self._slot_of, dtype=torch.long, device=device)
        return self._slot_cache[device]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_experts).cpu()
        self.last_expert_counts = counts
        self.total_expert_counts += counts
        slots = self._slots(flat.device)[flat]
        # Sorting by slot groups each local expert's (token, k) pairs in token order, as on one rank.
        order = torch.argsort(slots, stable=True)
        order = order[slots[order] >= 0]
        token_of = order // k
        slot_weight = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for i, e in enumerate(self.expert_ids):
            n = int(counts[e])
            if n == 0:
                continue
            rows = token_of[start : start + n]
            xe = x[rows]
            w1, w2 = self.gate_up[i], self.down[i]
            if upcast_for(xe, w1):
                w1 = float32_copy(self, "_gate_up_fp32", self.gate_up)[i]
                w2 = float32_copy(self, "_down_fp32", self.down)[i]
                gate, up = F.linear(xe.float(), w1).split(self.intermediate_size, dim=-1)
                y = F.linear(F.silu(gate) * up, w2).to(x.dtype)
            else:
                gate, up = F.linear(xe, w1).split(self.intermediate_size, dim=-1)
                y = F.linear(F.silu(gate) * up, w2)
            out.index_add_(0, rows, y * slot_weight[start : start + n, None])
            start += n
        self.all_reduce(out)
        return out


def shard_experts(model: torch.nn.Module, placement: ExpertPlacement, rank: int, all_reduce: AllReduce) -> None:
    """Swap every MoE layer's experts for this rank's share (call on the meta-device model, before loading)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert parallelism needs a mixture-of-experts model; this one has no MoE layers")
    local = placement.local_experts(rank)
    for moe in layers:
        old = moe.experts
        if old.num_experts != placement.num_experts:
            raise ValueError(f"placement is for {placement.num_experts} experts, the model has {old.num_experts}")
        hidden = old.gate_up.shape[-1]
        moe.experts = EPExperts(local, old.num_experts, hidden, old.intermediate_size, all_reduce)


def keep_weight(placement: ExpertPlacement, rank: int) -> Callable[[str], bool]:
    """A checkpoint-name filter: routed-expert tensors of other ranks are never read."""
    local = set(placement.local_experts(rank))

    def keep(name: str) -> bool:
        m = _EXPERT_WEIGHT.search(name)
        return m is None or int(m.group(1)) in local

    return keep

