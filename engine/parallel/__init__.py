"""Expert parallelism: MoE experts sharded across a group of ranks (see DESIGN.md)."""
from engine.parallel.placement import ExpertPlacement

__all__ = ["ExpertPlacement"]
