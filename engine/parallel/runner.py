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
from engine.model_runner import ModelRunner
from engine.parallel import plan
from engine.parallel.expert import keep_weight, shard_experts
from engine.parallel.group import EPGroup, EPGroupError
from engine.parallel.placement import ExpertPlacement
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

# Gloo reports a dead or silent peer as RuntimeError (DistBackendError is one); a dead child's
# stdin as OSError.
_GROUP_ERRORS = (RuntimeError, OSError)


def placement_for(config: EngineConfig, size: int) -> ExpertPlacement:
    """The contiguous placement for this model, or ValueError for a dense model / bad size."""
    if size < 1:
        raise ValueError(f"expert_parallel_size must be >= 1, got {size}")
    hf = config.model.hf_config
    num_experts = hf.get("moe_num_experts") or hf.get("num_experts")
    if not num_experts:
        raise ValueError(f"expert_parallel_size={size} needs a mixture-of-experts model; "
                         f"{config.model.architecture} is dense")
    return ExpertPlacement.contiguous(int(num_experts), size)


class EPLeaderRunner(ModelRunner):
    """Rank 0's runner: its own share of the experts, plus the group that holds the rest."""

    def __init__(self, config: EngineConfig, device: str, size: int, worker_config: dict[str, Any],
                 timeout_s: float = 30.0) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError("expert parallelism runs on CPU (gloo) in this version")
        self.placement = placement_for(config, size)
        self.group = EPGroup(size, worker_config, timeout_s)
        try:
            super().__init__(
                config, device,
                shard=lambda m: shard_experts(m, self.placement, 0, self.group.all_reduce),
                keep_weight=keep_weight(self.placement, 0),
            )
            self.model.register_forward_pre_hook(self._send_plan)
        except BaseException:
            self.group.close(graceful=False)
            raise

    def _send_plan(self, module: torch.nn.Module, args: tuple) -> None:
        ids, positions, meta = args
        self.group.send({"op": "forward", **plan.encode(ids, positions, meta)})

    def _guarded(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        # Any failure inside a forward leaves the ranks at different points: the group is done.
        try:
            return fn(*args)
        except EPGroupError:
            raise
        except _GROUP_ERRORS as e:
            self.group.fail(e)
            raise  # unreachable: fail() raises

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        return self._guarded(super().execute, out)

    def prompt_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        return self._guarded(super().prompt_logits, token_ids, block_ids)

    def close(self) -> None:
        self.group.close()


def run_follower(config: EngineConfig, rank: int, size: int, all_reduce: Callable[[torch.Tensor], None],
                 read_command: Callable[[], dict[str, Any] | None]) -> None:
    """A child rank's loop: build its share of the model, run each forward rank 0 sends, until stop."""
    placement = placement_for(config, size)
    runner = ModelRunner(
        config, "cpu",
        shard=lambda m: shard_experts(m, placement, rank, all_reduce),
        keep_weight=keep_weight(placement, rank),
    )
    logger.info("EP rank %d/%d ready with experts %s", rank, size, placement.local_experts(rank))
    with torch.inference_mode():
        while True:
            cmd = read_command()
            if cmd is None or cmd["op"] == "stop":
                return
            if cmd["op"] != "forward":
                raise ValueError(f"unknown EP command {cmd['op']!r}")
            ids, positions, meta = plan.decode(cmd, runner.device)
            runner.model(ids, positions, meta)

