"""Which ranks of an expert-parallel group hold each routed expert, and how to rebalance that
from observed load (EPLB). Pure: no I/O, no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ExpertPlacement:
    """`rank_experts[r]` lists the global ids of the routed experts rank `r` holds, ascending.

    An expert may sit on several ranks (a replica of a hot expert); every expert is held at least
    once and no rank holds one twice. A rank's position in its own list is its local slot.
    """

    num_experts: int
    ep_size: int
    rank_experts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {self.ep_size}")
        if len(self.rank_experts) != self.ep_size:
            raise ValueError(f"placement lists {len(self.rank_experts)} ranks for a group of {self.ep_size}")
        for r, experts in enumerate(self.rank_experts):
            if not experts:
                raise ValueError(f"rank {r} holds no expert")
            if list(experts) != sorted(set(experts)):
                raise ValueError(f"rank {r}'s experts must be distinct and ascending, got {list(experts)}")
            bad = [e for e in experts if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"expert {bad[0]} is outside [0, {self.num_experts})")
        held = {e for experts in self.rank_experts for e in experts}
        missing = [e for e in range(self.num_experts) if e not in held]
        if missing:
            raise ValueError(f"expert {missing[0]} is held by no rank")

    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int, redundant: int = 0) -> "ExpertPlacement":
        """Rank r holds experts [r*E/N, (r+1)*E/N), plus `redundant` replicas of the experts that
        follow its block (a starting point; `balanced` places replicas by load)."""
        if ep_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {ep_size}")
        if num_experts < 1 or num_experts % ep_size != 0:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {ep_size} ranks")
        per = num_experts // ep_size
        if not 0 <= redundant <= num_experts - per:
            raise ValueError(f"num_redundant_experts must be in [0, {num_experts - per}] for {num_experts} "
                             f"experts over {ep_size} ranks, got {redundant}")
        return cls(num_experts, ep_size, tuple(
            tuple(sorted((r * per + j) % num_experts for j in range(per + redundant))) for r in range(ep_size)
        ))

    @property
    def slots_per_rank(self) -> int:
        return max(len(x) for x in self.rank_experts)

    def holders(self, expert: int) -> tuple[int, ...]:
        """The ranks holding `expert`, ascending."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.num_experts})")
        return tuple(r for r, experts in enumerate(self.rank_experts) if expert in experts)

    def local_experts(self, rank: int) -> tuple[int, ...]:
        """The global ids of the experts `rank` holds, ascending (its local slot order)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} is outside the group of {self.ep_size}")
        return self.rank_experts[rank]

    def rank_loads(self, counts: Sequence[int]) -> list[float]:
        """Expected tokens per rank for per-expert `counts` if each expert's tokens split evenly
        over its replicas (the dispatcher spreads them by token index)."""
        reps = [len(self.holders(e)) for e in range(self.num_experts)]
        return [sum(counts[e] / reps[e] for e in experts) for experts in self.rank_experts]

    def to_json(self) -> list[list[int]]:
        return [list(x) for x in self.rank_experts]

    @classmethod
    def from_json(cls, num_experts: int, data: Sequence[Sequence[int]]) -> "ExpertPlacement":
        return cls(num_experts, len(data), tuple(tuple(int(e) for e in x) for x in data))


def imbalance(loads: Sequence[float]) -> float:
    """max / mean rank load: 1.0 is perfect balance (the step waits for the busiest rank)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def balanced(counts: Sequence[int], ep_size: int, slots_per_rank: int) -> ExpertPlacement:
    """A placement for observed per-expert `counts`: the hottest experts get extra replicas
    (highest tokens-per-replica first) until every slot is used, then replicas go, heaviest first,
    to the least-loaded rank with a free slot that does not already hold that expert."""
    num_experts = len(counts)
    if ep_size < 1 or slots_per_rank < 1:
        raise ValueError("ep_size and slots_per_rank must be >= 1")
    if ep_size * slots_per_rank < num_experts:
        raise ValueError(f"{ep_size} ranks x {slots_per_rank} slots cannot hold {num_experts} experts")
    if any(c < 0 for c in counts):
        raise ValueError("expert counts must be >= 0")
    reps = [1] * num_experts
    for _ in range(ep_size * slots_per_rank - num_experts):
        candidates = [e for e in range(num_experts) if reps[e] < ep_size]
        if not candidates:
            break
        hot = max(candidates, key=lambda e: (counts[e] / reps[e], -e))
        reps[hot] += 1
    # Multi-replica experts first (they need distinct ranks), then by load per replica.
    order = sorted(range(num_experts), key=lambda e: (-reps[e], -counts[e] / reps[e], e))
    load = [0.0] * ep_size
    held: list[list[int]] = [[] for _ in range(ep_size)]
    for e in order:
        free = [r for r in range(ep_size) if len(held[r]) < slots_per_rank]
        # Every single-replica expert finds a slot (capacity >= replicas); a replica that cannot
        # get a distinct rank is dropped rather than doubled up.
        chosen = sorted(free, key=lambda r: (load[r], r))[: reps[e]]
        for r in chosen:
            held[r].append(e)
            load[r] += counts[e] / len(chosen)
    return ExpertPlacement(num_experts, ep_size, tuple(tuple(sorted(x)) for x in held))
