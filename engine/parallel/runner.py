"""Model runners for the ranks of an expert-parallel group.

Rank 0 keeps the whole engine (scheduler, sampling, detokenization) and an `EPLeaderRunner`;
before each forward it sends the forward's inputs to the other ranks, which run the identical
forward on their replicated attention/KV and their own experts. Only rank 0 samples, so ranks
cannot diverge: the others never decide anything.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from engine.config import EngineConfig
from engine.loader import iter_weights
from engine.model_runner import ModelRunner
from engine.models.registry import build_model
from engine.parallel import plan
from engine.parallel.expert import (DISPATCH_MODES, Collectives, ep_layers, keep_weight, moe_layer_experts,
                                    replace_experts, shard_experts)
from engine.parallel.group import EPGroup, EPGroupError, Launcher
from engine.parallel.placement import ExpertPlacement, balanced
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

# Gloo reports a dead or silent peer as RuntimeError (DistBackendError is one); a dead child's
# stdin as OSError.
_GROUP_ERRORS = (RuntimeError, OSError)


def initial_placements(config: EngineConfig, size: int, redundant: int = 0) -> dict[int, ExpertPlacement]:
    """Contiguous placement for every MoE layer, or ValueError for a dense model / bad size."""
    if size < 1:
        raise ValueError(f"expert_parallel_size must be >= 1, got {size}")
    hf = config.model.hf_config
    with torch.device("meta"):
        counts = moe_layer_experts(build_model(config.model.architecture, hf))
    if not counts:
        raise ValueError(f"expert_parallel_size={size} needs a mixture-of-experts model; "
                         f"{config.model.architecture} is dense")
    # A modality-isolated layer places its text and vision experts as one set of 2E.
    return {i: ExpertPlacement.contiguous(n, size, redundant) for i, n in counts.items()}


def placements_to_json(placements: dict[int, ExpertPlacement]) -> dict[str, list[list[int]]]:
    return {str(i): p.to_json() for i, p in placements.items()}


def placements_from_json(data: dict[str, Any], num_experts: int) -> dict[int, ExpertPlacement]:
    return {int(i): ExpertPlacement.from_json(num_experts, x) for i, x in data.items()}


def _read_checkpoint(config: EngineConfig) -> Callable[[Callable[[str], bool]], Any]:
    return lambda keep: iter_weights(config.model.path, keep)


class EPLeaderRunner(ModelRunner):
    """Rank 0's runner: its own share of the experts, plus the group that holds the rest.

    `num_redundant_experts` extra slots per rank hold replicas; `eplb_interval > 0` rebalances the
    placement from the counts seen since the last rebalance every that many steps; `launcher`
    starts ranks 1..N-1 (child processes by default, Ray actors in the cluster); `dispatch` picks
    how MoE layers move tokens (see EPMoE)."""

    def __init__(self, config: EngineConfig, device: str, size: int, worker_config: dict[str, Any],
                 timeout_s: float = 30.0, num_redundant_experts: int = 0, eplb_interval: int = 0,
                 launcher: Launcher | None = None, dispatch: str = "replicated") -> None:
        if torch.device(device).type != "cpu":
            raise ValueError("expert parallelism runs on CPU (gloo) in this version")
        if eplb_interval < 0:
            raise ValueError(f"eplb_interval must be >= 0, got {eplb_interval}")
        self.placements = initial_placements(config, size, num_redundant_experts)
        self.eplb_interval = eplb_interval
        self._steps = 0
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"ep dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        self.group = EPGroup(size, {**worker_config, "num_redundant_experts": num_redundant_experts,
                                    "dispatch": dispatch}, timeout_s, launcher)
        try:
            super().__init__(
                config, device,
                shard=lambda m: shard_experts(m, self.placements, self.group.comm, dispatch),
                keep_weight=keep_weight(self.placements, 0),
            )
            self.model.register_forward_pre_hook(self._send_plan)
        except BaseException:
            self.group.close(graceful=False)
            raise
        self._window_start = [c.clone() for c in self.expert_counts(total=True)]

    def _send_plan(self, module: torch.nn.Module, args: tuple) -> None:
        ids, positions, meta = args[:3]
        mm = args[3] if len(args) > 3 else None
        cmd = {"op": "forward", **plan.encode(ids, positions, meta)}
        if mm is not None:
            cmd["mm"] = plan.encode_multimodal(mm)
        self.group.send(cmd)
        if mm is not None and mm.embeds is not None:
            self.group.comm.broadcast(mm.embeds.contiguous())

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Any failure inside a forward leaves the ranks at different points: the group is done.
        try:
            return fn(*args)
        except EPGroupError:
            raise
        except _GROUP_ERRORS as e:
            self.group.fail(e)
            raise  # unreachable: fail() raises

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        logits = self._guarded(super().execute, out)
        self._steps += 1
        if self.eplb_interval and self._steps % self.eplb_interval == 0:
            self.rebalance()
        return logits

    def prompt_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        return self._guarded(super().prompt_logits, token_ids, block_ids)

    def sync_blocks(self, block_ids: list[int]) -> None:
        """Copy KV imported into rank 0's cache to the other ranks: each runs attention over the
        whole batch on its own replica of the cache."""
        if block_ids:
            self.group.send({"op": "kv", "blocks": block_ids})
            self._guarded(self.group.comm.broadcast, self.export_blocks(block_ids))

    def rank_pairs(self) -> dict[int, list[int]]:
        """Per MoE layer, the (token, expert) pairs each rank has computed since load (each layer
        waits for its busiest rank, so balance matters layer by layer)."""
        return {m.layer_index: m.experts.total_rank_pairs.tolist() for m in ep_layers(self.model)}

    def window_counts(self) -> dict[int, list[int]]:
        """Per MoE layer, tokens routed to each expert since the last rebalance."""
        totals = self.expert_counts(total=True)
        return {i: (t - s).tolist() for i, t, s in zip(self.placements, totals, self._window_start)}

    def rebalance(self, placements: dict[int, ExpertPlacement] | None = None) -> dict[int, ExpertPlacement]:
        """Re-place experts (replicas to the hottest) from the counts since the last rebalance, or
        to `placements`, on every rank, between steps. Outputs do not change; load balance does."""
        if placements is None:
            counts = self.window_counts()
            placements = {i: balanced(counts[i], p.ep_size, p.slots_per_rank) for i, p in self.placements.items()}
        if set(placements) != set(self.placements):
            raise ValueError(f"placements must cover MoE layers {sorted(self.placements)}")
        for i, p in placements.items():
            if p.ep_size != self.group.size or p.num_experts != self.placements[i].num_experts:
                raise ValueError(f"layer {i}: placement is for {p.num_experts} experts over {p.ep_size} ranks")
        self.group.send({"op": "place", "layers": placements_to_json(placements)})
        self._guarded(replace_experts, self.model, placements, _read_checkpoint(self.config))
        self.placements = dict(placements)
        self._window_start = [c.clone() for c in self.expert_counts(total=True)]
        logger.info("EP placement rebalanced: %s", {i: p.to_json() for i, p in placements.items()})
        return self.placements

    def close(self) -> None:
        self.group.close()


def run_follower(config: EngineConfig, comm: Collectives, num_redundant_experts: int,
                 read_command: Callable[[], dict[str, Any] | None], dispatch: str = "replicated") -> None:
    """A child rank's loop: build its share of the model, run each forward rank 0 sends, re-place
    experts when told, until stop."""
    placements = initial_placements(config, comm.size, num_redundant_experts)
    num_experts = next(iter(placements.values())).num_experts
    runner = ModelRunner(
        config, "cpu",
        shard=lambda m: shard_experts(m, placements, comm, dispatch),
        keep_weight=keep_weight(placements, comm.rank),
    )
    logger.info("EP rank %d/%d ready", comm.rank, comm.size)
    with torch.inference_mode():
        while True:
            cmd = read_command()
            if cmd is None or cmd["op"] == "stop":
                return
            if cmd["op"] == "forward":
                ids, positions, meta = plan.decode(cmd, runner.device)
                if "mm" in cmd:
                    runner.model(ids, positions, meta, plan.decode_multimodal(cmd["mm"], runner.device, comm.broadcast))
                else:
                    runner.model(ids, positions, meta)
            elif cmd["op"] == "kv":
                blocks = cmd["blocks"]
                data = torch.empty(len(runner.kv_caches), len(blocks), *runner.kv_shape_per_block,
                                   dtype=config.model.dtype, device=runner.device)
                comm.broadcast(data)
                runner.import_blocks(blocks, data)
            elif cmd["op"] == "place":
                replace_experts(runner.model, placements_from_json(cmd["layers"], num_experts), _read_checkpoint(config))
            else:
                raise ValueError(f"unknown EP command {cmd['op']!r}")
