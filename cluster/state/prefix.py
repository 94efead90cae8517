"""Block hash chains of token sequences, computed exactly as the engine's block manager does.

The router's prefix index (Redis) is keyed by these hashes and the workers publish the same
ones, so both sides must use the engine's own `hash_block` and starting parent (`NO_HASH`).
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.block_manager import NO_HASH, hash_block


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hash chain of the full blocks of `token_ids` (a trailing partial block has no hash)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = list(token_ids)
    hashes: list[int] = []
    parent = NO_HASH
    for i in range(len(tokens) // block_size):
        parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
