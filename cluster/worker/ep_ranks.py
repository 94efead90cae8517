"""Ranks 1..N-1 of an expert-parallel worker as Ray actors, in the worker's placement group.

The worker actor (rank 0) is scheduled in bundle 0 of a STRICT_PACK placement group with one
bundle per rank; each other rank is an `EPRankActor` in its own bundle, so the group is placed
(and its CPUs reserved) as a whole on one node. The ranks talk over loopback (gloo + the command
connection, see engine.parallel.group); configs travel as JSON strings. Actors created by the
worker actor are owned by it: when it dies, Ray ends them too.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class EPRankActor:
    """One non-zero rank: runs the follower loop in `run` until rank 0 stops it or goes away."""

    def where(self) -> tuple[int, str | None, list]:
        """(pid, hex id of the placement group this rank runs in or None, the GPU ids Ray gave it).
        Ask before `run`: the actor runs one method at a time."""
        return os.getpid(), ray.get_runtime_context().get_placement_group_id() or None, list(ray.get_gpu_ids())

    def run(self, config_json: str) -> int:
        from cluster.cpu_binding import reset_niceness
        from engine.parallel.worker import serve_rank

        reset_niceness()  # Ray's default nice 15 would let any process stall the group's collectives

        logging.basicConfig(level=logging.WARNING)
        return serve_rank(json.loads(config_json))


class RayRanks:
    """`engine.parallel.group.RankHandles` for EPRankActor ranks."""

    def __init__(self, configs: list[dict[str, Any]], placement_group: PlacementGroup | None,
                 num_cpus: float = 1.0) -> None:
        self.actors = []
        bundles = placement_group.bundle_specs if placement_group is not None else []
        for i, _ in enumerate(configs, start=1):
            options: dict[str, Any] = {"num_cpus": num_cpus}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=i)
                # Take what the rank's bundle reserved: GPUs too (Ray then sets the rank's
                # CUDA_VISIBLE_DEVICES), or a GPU pool's ranks would run without their devices.
                spec = bundles[i] if i < len(bundles) else {}
                options["num_cpus"] = spec.get("CPU", num_cpus)
                if spec.get("GPU"):
                    options["num_gpus"] = spec["GPU"]
            self.actors.append(EPRankActor.options(**options).remote())
        where = ray.get([a.where.remote() for a in self.actors])
        self._pids = [pid for pid, _, _ in where]
        self.placement_group_ids = [pg for _, pg, _ in where]
        self.gpu_ids = [gpus for _, _, gpus in where]
        self.runs = [a.run.remote(json.dumps(cfg)) for a, cfg in zip(self.actors, configs)]

    def pids(self) -> list[int]:
        return list(self._pids)

    def exit_status(self, index: int) -> str | None:
        ready, _ = ray.wait([self.runs[index]], timeout=0)
        if not ready:
            return None
        try:
            return f"returned {ray.get(ready[0])}"
        except Exception as e:  # the actor died: RayActorError and friends
            return f"died ({type(e).__name__})"

    def wait(self, timeout_s: float) -> bool:
        _, pending = ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        return not pending

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def ray_launcher(num_cpus: float = 1.0):
    """A launcher for `LLMEngine.from_args(ep_launcher=...)` inside a Ray actor: the other ranks
    go into bundles 1..N-1 of the caller's placement group (or anywhere, if it has none)."""
    group = get_current_placement_group()

    def launch(configs: list[dict[str, Any]]) -> RayRanks:
        if group is None:
            logger.warning("EP worker is not in a placement group: its ranks may land on other nodes")
        return RayRanks(configs, group, num_cpus)

    return launch
