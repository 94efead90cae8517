"""Expert placement over an expert-parallel group (pure)."""
from __future__ import annotations

import pytest

from engine.parallel import ExpertPlacement
from engine.parallel.expert import keep_weight


def test_contiguous_blocks():
    p = ExpertPlacement.contiguous(8, 2)
    assert p.local_experts(0) == (0, 1, 2, 3)
    assert p.local_experts(1) == (4, 5, 6, 7)
    assert [p.owner(e) for e in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ExpertPlacement.contiguous(8, 1).local_experts(0) == tuple(range(8))
    assert ExpertPlacement.contiguous(8, 8).local_experts(5) == (5,)


@pytest.mark.parametrize("experts, size", [(8, 3), (8, 0), (8, -1), (0, 1), (4, 8)])
def test_bad_sizes(experts, size):
    with pytest.raises(ValueError):
        ExpertPlacement.contiguous(experts, size)


def test_bad_queries_and_placements():
    p = ExpertPlacement.contiguous(8, 2)
    for bad in (lambda: p.owner(8), lambda: p.owner(-1), lambda: p.local_experts(2)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        ExpertPlacement(4, 2, (0, 0, 0, 0))  # rank 1 owns nothing
    with pytest.raises(ValueError):
        ExpertPlacement(4, 2, (0, 1, 2, 1))  # rank 2 is outside the group
    # Any assignment is allowed (room for a rebalance), not only contiguous blocks.
    assert ExpertPlacement(4, 2, (1, 0, 1, 0)).local_experts(1) == (0, 2)


def test_weight_filter_reads_only_local_experts():
    keep = keep_weight(ExpertPlacement.contiguous(8, 2), 1)
    assert keep("model.layers.1.mlp.experts.5.up_proj.weight")
    assert not keep("model.layers.1.mlp.experts.3.up_proj.weight")
    assert keep("model.layers.1.mlp.shared_experts.up_proj.weight")
    assert keep("model.layers.1.mlp.gate.weight")
    assert keep("model.layers.0.mlp.down_proj.weight")
