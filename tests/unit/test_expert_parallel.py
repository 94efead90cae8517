"""Expert placement over an expert-parallel group, EPLB and the dispatch tables (pure logic)."""
from __future__ import annotations

import random

import pytest
import torch

from engine.parallel import ExpertPlacement
from engine.parallel.expert import EPExperts, keep_weight, token_share
from engine.parallel.placement import balanced, imbalance


def test_contiguous_blocks():
    p = ExpertPlacement.contiguous(8, 2)
    assert p.local_experts(0) == (0, 1, 2, 3)
    assert p.local_experts(1) == (4, 5, 6, 7)
    assert [p.holders(e) for e in range(8)] == [(0,)] * 4 + [(1,)] * 4
    assert ExpertPlacement.contiguous(8, 1).local_experts(0) == tuple(range(8))
    assert ExpertPlacement.contiguous(8, 8).local_experts(5) == (5,)


def test_contiguous_with_redundant_slots():
    p = ExpertPlacement.contiguous(8, 2, redundant=1)
    assert p.local_experts(0) == (0, 1, 2, 3, 4)  # its block plus the next expert
    assert p.local_experts(1) == (0, 4, 5, 6, 7)  # wraps around
    assert p.holders(4) == (0, 1) and p.holders(1) == (0,)
    assert p.slots_per_rank == 5
    with pytest.raises(ValueError, match="num_redundant_experts"):
        ExpertPlacement.contiguous(8, 2, redundant=5)


@pytest.mark.parametrize("experts, size", [(8, 3), (8, 0), (8, -1), (0, 1), (4, 8)])
def test_bad_sizes(experts, size):
    with pytest.raises(ValueError):
        ExpertPlacement.contiguous(experts, size)


def test_bad_queries_and_placements():
    p = ExpertPlacement.contiguous(8, 2)
    for bad in (lambda: p.holders(8), lambda: p.holders(-1), lambda: p.local_experts(2)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="held by no rank"):
        ExpertPlacement(4, 2, ((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="holds no expert"):
        ExpertPlacement(4, 2, ((0, 1, 2, 3), ()))
    with pytest.raises(ValueError, match="distinct"):
        ExpertPlacement(4, 2, ((0, 0, 1), (2, 3)))
    with pytest.raises(ValueError, match="outside"):
        ExpertPlacement(4, 2, ((0, 1), (2, 3, 4)))
    with pytest.raises(ValueError, match="ranks"):
        ExpertPlacement(4, 2, ((0, 1, 2, 3),))
    # Any assignment is allowed (room for a rebalance), not only contiguous blocks.
    assert ExpertPlacement(4, 2, ((1, 3), (0, 2))).local_experts(1) == (0, 2)
    assert ExpertPlacement.from_json(4, p.to_json()[:0] + [[0, 1], [2, 3]]).holders(3) == (1,)


def test_balanced_spreads_a_skewed_load():
    # Experts 0..3 take 90% of the tokens; contiguous puts all of them on rank 0.
    counts = [300, 250, 200, 150, 30, 30, 20, 20]
    start = ExpertPlacement.contiguous(8, 2, redundant=1)
    p = balanced(counts, 2, start.slots_per_rank)
    assert all(len(x) <= 5 for x in p.rank_experts)
    assert len(p.holders(0)) == 2  # the hottest expert is replicated on both ranks
    assert imbalance(p.rank_loads(counts)) < 1.05 < imbalance(start.rank_loads(counts))
    # Without spare slots it still balances by moving experts.
    q = balanced(counts, 2, 4)
    assert all(len(q.holders(e)) == 1 for e in range(8))
    assert imbalance(q.rank_loads(counts)) < 1.1 < imbalance(ExpertPlacement.contiguous(8, 2).rank_loads(counts))


def test_balanced_is_valid_for_random_loads():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.choice([1, 2, 3, 4])
        per = rng.randint(1, 4)
        e = n * per
        slots = per + rng.randint(0, e - per)
        counts = [rng.choice([0, rng.randint(0, 1000)]) for _ in range(e)]
        p = balanced(counts, n, slots)  # validated by ExpertPlacement itself
        assert p.slots_per_rank <= slots
        assert sum(len(x) for x in p.rank_experts) >= e
    with pytest.raises(ValueError):
        balanced([1, 2, 3], 1, 2)  # not enough slots
    with pytest.raises(ValueError):
        balanced([1, -2], 2, 1)


def test_token_shares_cover_the_batch():
    for T in range(0, 12):
        for n in (1, 2, 3, 4):
            shares = [token_share(T, n, r) for r in range(n)]
            assert shares[0][0] == 0 and shares[-1][1] == T
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


class _Rank:
    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


def test_dispatch_prefers_local_replica_and_spreads_the_rest():
    p = ExpertPlacement(4, 3, ((0, 1), (0, 2), (0, 3)))  # expert 0 on every rank; 1..3 single
    ep = EPExperts(p, _Rank(1, 3), hidden_size=2, intermediate_size=2)
    experts = torch.tensor([0, 0, 1, 2, 3, 1])
    tokens = torch.tensor([0, 1, 2, 3, 4, 5])
    assert ep.destinations(experts, tokens, 1).tolist() == [1, 1, 0, 1, 2, 0]
    # Per-pair sources (each token's share owner): rank 2 keeps expert 0 and sends expert 1 to rank 0.
    assert ep.destinations(experts, tokens, torch.tensor([2, 0, 2, 2, 2, 0])).tolist() == [2, 0, 0, 1, 2, 0]
    q = ExpertPlacement(4, 3, ((0, 1), (0, 2), (1, 3)))  # expert 1 on ranks 0 and 2, not here
    ep = EPExperts(q, _Rank(1, 3), hidden_size=2, intermediate_size=2)
    dest = ep.destinations(torch.tensor([1] * 6), torch.arange(6), 1)
    assert dest.tolist() == [0, 2, 0, 2, 0, 2]


def test_weight_filter_reads_only_local_experts():
    placements = {1: ExpertPlacement.contiguous(8, 2), 2: ExpertPlacement(8, 2, ((4, 5, 6, 7), (0, 1, 2, 3)))}
    keep = keep_weight(placements, 1)
    assert keep("model.layers.1.mlp.experts.5.up_proj.weight")
    assert not keep("model.layers.1.mlp.experts.3.up_proj.weight")
    assert keep("model.layers.2.mlp.experts.3.up_proj.weight")  # per layer
    assert not keep("model.layers.2.mlp.experts.5.up_proj.weight")
    assert keep("model.layers.1.mlp.shared_experts.up_proj.weight")
    assert keep("model.layers.1.mlp.gate.weight")
    assert keep("model.layers.0.mlp.down_proj.weight")
