"""The expert-parallel MoE layer for one rank, and the helpers that shard and re-place experts.

Attention runs replicated over the whole batch (one scheduler on rank 0), so every rank holds
every token's hidden state. Each MoE layer splits the batch into contiguous token shares, one per
rank; rank r runs the shared experts on its share and ends up with its share's MoE output, and
the shares are all-gathered back into the whole batch for the next (replicated) layer. In between,
each (token, expert) pair is computed on a rank holding that expert, in one of two ways:

- "replicated" (default): every rank routes the whole batch (the router is cheap and the hidden
  states are already there), computes the pairs assigned to it, and one all-to-all returns the
  results to each token's share owner;
- "alltoall": rank r routes only its share and dispatches the pairs' hidden states to the
  experts' holders (all-to-all after an all-gather of the counts), which return the results
  (all-to-all): the general scheme, for ranks that do not hold each other's tokens.

The combine adds a token's expert outputs in ascending expert order, as the single-rank
`Experts` does, so EP=N computes the same sums as EP=1.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Protocol

import torch

from engine.layers.moe import ModalityIsolatedMoE, SparseMoE, expert_ffn, padded_expert
from engine.parallel.placement import ExpertPlacement

_EXPERT_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.")
DISPATCH_MODES = ("replicated", "alltoall")
_LAYER_NAME = re.compile(r"(?:^|\.)(layers\.\d+\.)")
_FUSED_EXPERTS = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(?:gate_up_proj|down_proj)$")


class Collectives(Protocol):
    """The group operations an EP layer needs (gloo on CPU)."""

    rank: int
    size: int

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape everywhere), in rank order."""
        ...

    def all_to_all(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows of `t` split by `send_splits` go to ranks 0..N-1; returns the rows received, by source rank."""
        ...


def token_share(num_tokens: int, size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous [start, end) share of a batch of `num_tokens`."""
    base, extra = divmod(num_tokens, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class EPExperts(torch.nn.Module):
    """This rank's routed experts (gate_up [n, 2I, H], down [n, H, I], in `expert_ids` order) and
    the dispatch/combine of a token share over the group."""

    def __init__(self, placement: ExpertPlacement, comm: Collectives, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.placement = placement
        self.comm = comm
        self.num_experts = placement.num_experts  # global: router ids index the whole set
        self.expert_ids = placement.local_experts(comm.rank)  # the decoder's load_weights reads only these
        self.intermediate_size = intermediate_size
        n = len(self.expert_ids)
        self._slot_of = {e: i for i, e in enumerate(self.expert_ids)}
        self.gate_up = torch.nn.Parameter(torch.zeros(n, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.down = torch.nn.Parameter(torch.zeros(n, hidden_size, intermediate_size), requires_grad=False)
        E = placement.num_experts
        holders = [placement.holders(e) for e in range(E)]
        width = max(len(h) for h in holders)
        # Dispatch tables (CPU): the ranks holding each expert (padded), replicas per expert, and
        # whether rank r holds expert e.
        self._holders = torch.tensor([list(h) + [h[0]] * (width - len(h)) for h in holders], dtype=torch.long, device="cpu")
        self._num_holders = torch.tensor([len(h) for h in holders], dtype=torch.long, device="cpu")
        self._holds = torch.tensor([[r in h for r in range(comm.size)] for h in holders], dtype=torch.bool, device="cpu")
        # Global counts (every rank learns the whole send matrix), explicitly on the CPU: the
        # module may be built under torch.device("meta").
        self.last_expert_counts = torch.zeros(E, dtype=torch.int64, device="cpu")
        self.total_expert_counts = torch.zeros(E, dtype=torch.int64, device="cpu")
        # (token, expert) pairs computed on each rank since load: the load balance EPLB acts on.
        self.total_rank_pairs = torch.zeros(comm.size, dtype=torch.int64, device="cpu")

    def destinations(self, experts: torch.Tensor, tokens: torch.Tensor, sources: torch.Tensor | int) -> torch.Tensor:
        """The rank each (token, expert) pair is computed on: its source rank if that holds the
        expert, else one of the expert's holders chosen by global token index (spreads a
        replicated expert's load)."""
        pick = self._holders[experts, tokens % self._num_holders[experts]]
        sources = torch.as_tensor(sources, dtype=torch.long).expand_as(experts)
        return torch.where(self._holds[experts, sources], sources, pick)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_token: int) -> torch.Tensor:
        """Routed-expert output for this rank's token share `x` ([t, H], global index `first_token`)."""
        comm, E, N = self.comm, self.num_experts, self.comm.size
        t, k = ids.shape
        pair_expert = ids.reshape(-1).cpu()
        pair_token = torch.arange(t * k) // k
        dest = self.destinations(pair_expert, pair_token + first_token, comm.rank)
        key = dest * E + pair_expert
        order = torch.argsort(key, stable=True)  # by destination, then expert, then token
        send = torch.bincount(key, minlength=N * E).view(N, E)
        matrix = torch.stack(comm.all_gather(send))  # [source, destination, expert]
        self.last_expert_counts = matrix.sum(dim=(0, 1))
        self.total_expert_counts += self.last_expert_counts
        self.total_rank_pairs += matrix.sum(dim=(0, 2))
        send_splits = send.sum(1).tolist()
        recv_by_source = matrix[:, comm.rank]  # [source, expert]
        recv_splits = recv_by_source.sum(1).tolist()
        dev = x.device
        received = comm.all_to_all(x[pair_token[order].to(dev)], send_splits, recv_splits)
        # Each source sent its rows grouped by expert, ascending.
        recv_expert = torch.repeat_interleave(torch.arange(E).repeat(N), recv_by_source.reshape(-1))
        results = comm.all_to_all(self._compute(received, recv_expert), recv_splits, send_splits)
        return _combine(results, weights, order, pair_expert, pair_token, x)

    def forward_replicated(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Routed-expert output for tokens [start, end) when every rank holds the whole batch `x`
        and its routing: nothing needs dispatching, each rank computes the pairs it is assigned
        and one all-to-all returns the results to each token's share owner."""
        comm, E, N = self.comm, self.num_experts, self.comm.size
        T, k = ids.shape
        pair_expert = ids.reshape(-1).cpu()
        pair_token = torch.arange(T * k) // k
        bounds = torch.tensor([token_share(T, N, r)[1] for r in range(N)])
        home = torch.bucketize(pair_token, bounds, right=True)  # the rank whose share holds the token
        dest = self.destinations(pair_expert, pair_token, home)
        self.last_expert_counts = torch.bincount(pair_expert, minlength=E)
        self.total_expert_counts += self.last_expert_counts
        self.total_rank_pairs += torch.bincount(dest, minlength=N)
        dev = x.device
        # Mine to compute, sent home grouped by (home, expert, token).
        mine = torch.nonzero(dest == comm.rank).squeeze(1)
        mine = mine[torch.argsort(home[mine] * E + pair_expert[mine], stable=True)]
        send_splits = torch.bincount(home[mine], minlength=N).tolist()
        y = self._compute(x[pair_token[mine].to(dev)], pair_expert[mine])
        # My tokens' pairs come back from each computing rank in (expert, token) order.
        own = torch.arange(start * k, end * k)
        order = own[torch.argsort(dest[own] * E + pair_expert[own], stable=True)]
        recv_splits = torch.bincount(dest[own], minlength=N).tolist()
        results = comm.all_to_all(y, send_splits, recv_splits)
        return _combine(results, weights, order, pair_expert, pair_token - start, x[start:end])

    def _compute(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rows)
        order = torch.argsort(experts, stable=True).to(rows.device)
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        start = 0
        slot_of = self._slot_of
        for e, n in enumerate(counts):
            if n == 0:
                continue
            if e not in slot_of:
                raise RuntimeError(f"rank {self.comm.rank} received tokens for expert {e}, which it does not hold")
            idx = order[start : start + n]
            out[idx] = expert_ffn(self, slot_of[e], rows[idx])
            start += n
        return out


def _combine(results: torch.Tensor, weights: torch.Tensor, pairs: torch.Tensor, pair_expert: torch.Tensor,
             pair_token: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum router weight x expert output into one row per token of `like`: `results[i]` is pair
    `pairs[i]`'s output; each token's outputs are added in ascending expert order, as one rank does."""
    dev = like.device
    contrib = results * weights.reshape(-1)[pairs.to(dev)][:, None]
    by_expert = torch.argsort(pair_expert[pairs], stable=True)
    out = torch.zeros_like(like)
    out.index_add_(0, pair_token[pairs][by_expert].to(dev), contrib[by_expert.to(dev)])
    return out


class EPMoE(SparseMoE):
    """A SparseMoE whose routed experts are spread over the group; same parameter names.

    `dispatch="alltoall"` routes only this rank's share and sends the pairs' hidden states to the
    experts' holders (what ranks with different batches need); `"replicated"` (default) uses
    that every rank already holds the whole batch: each rank routes all of it, computes the pairs
    assigned to it, and only the results travel (2 collectives per layer instead of 4)."""

    def __init__(self, moe: SparseMoE, experts: EPExperts, layer_index: int, dispatch: str = "replicated") -> None:
        torch.nn.Module.__init__(self)
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"ep dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        self.dispatch = dispatch
        self.gate = moe.gate
        self.experts = experts
        self.shared_experts = moe.shared_experts
        self.layer_index = layer_index

    def route(self, x: torch.Tensor, vision_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, global expert ids) of the rows of `x`."""
        return self.gate(x)

    def forward(self, x: torch.Tensor, vision_rows: torch.Tensor | None = None) -> torch.Tensor:
        comm = self.experts.comm
        T = x.shape[0]
        start, end = token_share(T, comm.size, comm.rank)
        xs = x[start:end]
        if self.dispatch == "replicated":
            weights, ids = self.route(x, vision_rows)
            out = self.experts.forward_replicated(x, weights, ids, start, end)
        else:
            weights, ids = self.route(xs, None if vision_rows is None else vision_rows[start:end])
            out = self.experts(xs, weights, ids, start)
        if self.shared_experts is not None:
            out = out + self.shared_experts(xs)
        # All-gather needs equal shapes: pad every share to the largest.
        width = token_share(T, comm.size, 0)[1]
        padded = torch.zeros(width, *out.shape[1:], dtype=out.dtype, device=out.device)
        padded[: end - start] = out
        parts = comm.all_gather(padded)
        return torch.cat([p[: b - a] for p, (a, b) in zip(parts, (token_share(T, comm.size, r) for r in range(comm.size)))])


class EPModalityMoE(EPMoE):
    """ERNIE-4.5-VL's modality-isolated MoE over the group: the text and vision experts are one
    set of 2E global experts (text 0..E-1, vision E..2E-1, as the checkpoint numbers them), placed,
    counted and rebalanced together. Text rows take the text router, vision rows the vision router
    (its ids shifted by E); a token's experts are all of one modality, so combining in ascending
    global order sums as the single-rank layer does. The experts are stored at the wider of the two
    widths, the narrower zero-padded (padding adds exact zeros)."""

    takes_vision_rows = True

    def __init__(self, moe: ModalityIsolatedMoE, experts: EPExperts, layer_index: int,
                 dispatch: str = "replicated") -> None:
        super().__init__(moe.text_moe, experts, layer_index, dispatch)
        self.vision_gate = moe.vision_moe.gate
        self.shared_experts = moe.shared_experts
        self.num_text_experts = moe.text_moe.experts.num_experts

    def load_checkpoint(self, take: Callable[[str], torch.Tensor], put: Callable[..., None], prefix: str) -> None:
        """This rank's share from ERNIE-4.5-VL's checkpoint layout (routers transposed, [H, E]:
        gate.weight text, gate.weight_1 vision; one correction bias [2, E]; experts 0..2E-1),
        each expert padded to the layer's width. The decoder loads the shared experts."""
        bias = take(prefix + ".moe_statics.e_score_correction_bias").reshape(2, -1)
        for gate, name, row in ((self.gate, ".gate.weight", 0), (self.vision_gate, ".gate.weight_1", 1)):
            put(gate.weight, take(prefix + name).t(), keep_fp32=True)
            put(gate.e_score_correction_bias, bias[row], keep_fp32=True)
        e = prefix + ".experts"
        pairs = [padded_expert(take(f"{e}.{j}.gate_proj.weight"), take(f"{e}.{j}.up_proj.weight"),
                               take(f"{e}.{j}.down_proj.weight"), self.experts.intermediate_size)
                 for j in self.experts.expert_ids]
        put(self.experts.gate_up, torch.stack([gu for gu, _ in pairs]))
        put(self.experts.down, torch.stack([d for _, d in pairs]))

    def route(self, x: torch.Tensor, vision_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if vision_rows is None or not bool(vision_rows.any()):
            return self.gate(x)
        text_rows = ~vision_rows
        k = self.gate.top_k
        weights = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
        if bool(text_rows.any()):
            weights[text_rows], ids[text_rows] = self.gate(x[text_rows])
        w, i = self.vision_gate(x[vision_rows])
        weights[vision_rows], ids[vision_rows] = w, i + self.num_text_experts
        return weights, ids


def ep_layers(model: torch.nn.Module) -> list[EPMoE]:
    return [m for m in model.modules() if isinstance(m, EPMoE)]


def moe_layer_experts(model: torch.nn.Module) -> dict[int, int]:
    """Decoder-layer index -> routed experts of its MoE (a modality-isolated one: text + vision)."""
    out = {}
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if isinstance(mlp, ModalityIsolatedMoE):
            out[i] = mlp.text_moe.experts.num_experts + mlp.vision_moe.experts.num_experts
        elif isinstance(mlp, SparseMoE):
            out[i] = mlp.experts.num_experts
    return out


def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    """The decoder-layer indices whose MLP is a mixture of experts."""
    return list(moe_layer_experts(model))


def shard_experts(model: torch.nn.Module, placements: dict[int, ExpertPlacement], comm: Collectives,
                  dispatch: str = "replicated") -> None:
    """Swap every MoE layer for this rank's EP layer (call on the meta-device model, before loading)."""
    indices = moe_layer_indices(model)
    if not indices:
        raise ValueError("expert parallelism needs a mixture-of-experts model; this one has no MoE layers")
    counts = moe_layer_experts(model)
    for i in indices:
        moe = model.layers[i].mlp
        placement = placements[i]
        if counts[i] != placement.num_experts:
            raise ValueError(f"placement is for {placement.num_experts} experts, the model has {counts[i]}")
        if isinstance(moe, ModalityIsolatedMoE):
            text, vision = moe.text_moe.experts, moe.vision_moe.experts
            width = max(text.intermediate_size, vision.intermediate_size)
            experts = EPExperts(placement, comm, text.gate_up.shape[-1], width)
            model.layers[i].mlp = EPModalityMoE(moe, experts, i, dispatch)
            continue
        hidden = moe.experts.gate_up.shape[-1]
        model.layers[i].mlp = EPMoE(moe, EPExperts(placement, comm, hidden, moe.experts.intermediate_size), i, dispatch)


def keep_weight(placements: dict[int, ExpertPlacement], rank: int) -> Callable[[str], bool]:
    """A checkpoint-name filter: routed-expert tensors this rank does not hold are never read."""
    local = {i: set(p.local_experts(rank)) for i, p in placements.items()}

    def keep(name: str) -> bool:
        m = _EXPERT_WEIGHT.search(name)
        return m is None or int(m.group(2)) in local.get(int(m.group(1)), ())

    return keep


def replace_experts(model: torch.nn.Module, placements: dict[int, ExpertPlacement],
                    read: Callable[[Callable[[str], bool]], Iterable[tuple[str, torch.Tensor]]]) -> None:
    """Move every EP layer to a new placement between steps: experts this rank keeps are reused,
    the ones it gains are read from the checkpoint (`read(keep)` yields named tensors)."""
    plan: dict[int, tuple[EPMoE, EPExperts, dict[int, int]]] = {}
    for moe in ep_layers(model):
        old = moe.experts
        new = EPExperts(placements[moe.layer_index], old.comm, old.gate_up.shape[-1], old.intermediate_size)
        kept = {e: i for i, e in enumerate(old.expert_ids)}
        plan[moe.layer_index] = (moe, new, kept)
    need = {i: {e for e in new.expert_ids if e not in kept} for i, (_, new, kept) in plan.items()}

    def keep(name: str) -> bool:
        m = _EXPERT_WEIGHT.search(name)
        if m is not None:
            return int(m.group(2)) in need.get(int(m.group(1)), ())
        fused = _FUSED_EXPERTS.search(name)  # all experts of a layer in one tensor
        return fused is not None and bool(need.get(int(fused.group(1))))

    # By the name below the decoder prefix ("model." or a VL model's "model.language_model.").
    loaded = {name[m.start(1):] if (m := _LAYER_NAME.search(name)) else name: t for name, t in read(keep)}
    for i, (moe, new, kept) in plan.items():
        old = moe.experts
        gate_up, down = [], []
        for e in new.expert_ids:
            if e in kept:
                gate_up.append(old.gate_up[kept[e]])
                down.append(old.down[kept[e]])
            else:
                p = f"layers.{i}.mlp.experts."
                try:
                    if p + "gate_up_proj" in loaded:  # fused: gate rows first, as ours
                        gate_up.append(loaded[p + "gate_up_proj"][e])
                        down.append(loaded[p + "down_proj"][e])
                    else:
                        gu, dn = padded_expert(loaded[f"{p}{e}.gate_proj.weight"], loaded[f"{p}{e}.up_proj.weight"],
                                               loaded[f"{p}{e}.down_proj.weight"], old.intermediate_size)
                        gate_up.append(gu)
                        down.append(dn)
                except KeyError as err:
                    raise ValueError(f"checkpoint is missing weight {err.args[0]!r}") from None
        dtype, device = old.gate_up.dtype, old.gate_up.device
        new.gate_up.data = torch.stack(gate_up).to(device=device, dtype=dtype)
        new.down.data = torch.stack(down).to(device=device, dtype=dtype)
        new.total_expert_counts = old.total_expert_counts
        new.total_rank_pairs = old.total_rank_pairs
        moe.experts = new
