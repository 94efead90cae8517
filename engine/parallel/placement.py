"""Which rank of an expert-parallel group owns each routed expert. Pure: no I/O, no torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """`owners[e]` is the rank holding routed expert `e`.

    The default is contiguous blocks of E/N experts per rank. Owners is a tuple (not a formula)
    so a later rebalance can place experts freely; replicas would extend it to several owners.
    """

    num_experts: int
    ep_size: int
    owners: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {self.ep_size}")
        if len(self.owners) != self.num_experts:
            raise ValueError(f"placement names {len(self.owners)} owners for {self.num_experts} experts")
        bad = [r for r in self.owners if not 0 <= r < self.ep_size]
        if bad:
            raise ValueError(f"owner rank {bad[0]} is outside the group of {self.ep_size}")
        empty = [r for r in range(self.ep_size) if r not in self.owners]
        if empty:
            raise ValueError(f"rank {empty[0]} owns no expert")

    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """Rank r owns experts [r*E/N, (r+1)*E/N)."""
        if ep_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {ep_size}")
        if num_experts < 1 or num_experts % ep_size != 0:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {ep_size} ranks")
        per = num_experts // ep_size
        return cls(num_experts, ep_size, tuple(e // per for e in range(num_experts)))

    def owner(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.num_experts})")
        return self.owners[expert]

    def local_experts(self, rank: int) -> tuple[int, ...]:
        """The global ids of the experts `rank` holds, ascending (its local slot order)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} is outside the group of {self.ep_size}")
        return tuple(e for e, r in enumerate(self.owners) if r == rank)
