"""An expert-parallel engine whose other ranks are Ray actors in the caller's placement group (as
in the cluster): same greedy tokens as EP=1, the ranks sit in the group's bundles, a killed rank
fails the group at once, and no rank actor outlives the engine. Ray is started by the test."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.cluster_harness import pid_alive, ray_session
from tests.unit.test_fidelity import prompts_for

ray = pytest.importorskip("ray")

KW = dict(dtype="float32", num_kv_blocks=128, max_model_len=256)


@ray.remote(num_cpus=1)
class Rank0:
    """Stands in for the cluster's worker actor: rank 0 of the group, with the engine."""

    def __init__(self, path: str, **kw) -> None:
        import torch

        from cluster.worker.ep_ranks import ray_launcher
        from engine import LLMEngine

        torch.set_num_threads(1)
        self.engine = LLMEngine.from_args(path, expert_parallel_size=2, ep_launcher=ray_launcher(), **KW, **kw)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from engine import SamplingParams
        from tests.conftest import run_to_completion

        return run_to_completion(self.engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                      ignore_eos=True), prefix=str(time.monotonic()))

    def rank_pids(self) -> list[int]:
        return self.engine.runner.group.pids

    def placement_group_ids(self) -> list[str | None]:
        """Of this actor (rank 0) and of each other rank."""
        import ray

        ranks = self.engine.runner.group._ranks[0]  # RayRanks
        return [ray.get_runtime_context().get_placement_group_id()] + ranks.placement_group_ids

    def gpu_ids(self) -> list[list]:
        """Of this actor (rank 0) and of each other rank."""
        import ray

        return [list(ray.get_gpu_ids())] + self.engine.runner.group._ranks[0].gpu_ids

    def rebalance(self) -> None:
        self.engine.runner.rebalance()

    def close(self) -> None:
        self.engine.close()


@pytest.fixture(scope="module")
def ray_cpus():
    # Two GPUs that exist only in Ray's books: enough to see that ranks request their bundles' GPUs.
    with ray_session(num_cpus=4, num_gpus=2):
        yield


def test_ray_rank_actors_in_a_placement_group(ray_cpus, tiny_checkpoint):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine import LLMEngine
    from engine.parallel.group import EPGroupError
    from tests.conftest import run_to_completion
    from tests.unit.test_fidelity import GREEDY

    moe = str(tiny_checkpoint("ernie45_moe"))
    prompts = prompts_for(256)[:4]
    single = LLMEngine.from_args(moe, **KW)
    ref = run_to_completion(single, prompts, GREEDY.__class__(temperature=0.0, max_tokens=8, ignore_eos=True))

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        rank0 = Rank0.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
                              ).remote(moe, num_redundant_experts=1)
        assert ray.get(rank0.generate.remote(prompts, 8), timeout=120) == ref
        ray.get(rank0.rebalance.remote(), timeout=60)
        assert ray.get(rank0.generate.remote(prompts, 8), timeout=120) == ref
        (pid,) = ray.get(rank0.rank_pids.remote())
        # Rank 0 and the rank actor both run in the group (its 2 bundles, nothing else is free for them).
        assert ray.get(rank0.placement_group_ids.remote()) == [pg.id.hex()] * 2
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EPGroupError, match="rank 1"):
            try:
                ray.get(rank0.generate.remote(prompts, 64), timeout=60)
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
        assert time.monotonic() - t0 < 30
        ray.get(rank0.close.remote())
        ray.kill(rank0)
    finally:
        remove_placement_group(pg)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(pid)


def test_rank_actors_take_their_bundles_gpus(ray_cpus, tiny_checkpoint):
    """A GPU pool's EP worker reserves a GPU per rank; each rank actor must hold its own (Ray
    sets its CUDA_VISIBLE_DEVICES from it). The engine itself runs on CPU here."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    moe = str(tiny_checkpoint("ernie45_moe"))
    pg = placement_group([{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        rank0 = Rank0.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0)).remote(moe)
        ids = ray.get(rank0.gpu_ids.remote(), timeout=120)
        assert [len(g) for g in ids] == [1, 1] and ids[0] != ids[1], ids
        ray.get(rank0.close.remote())
        ray.kill(rank0)
    finally:
        remove_placement_group(pg)
