"""The KV block hash chain: names a full block of tokens by (parent block hash, its token ids).

The engine's prefix cache and the router's prefix index (Redis) key blocks by these hashes, so
both import them from here. Pure Python (no numpy): the same bytes on every host.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

NO_HASH = -1


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable 63-bit hash of (parent block hash, token ids): the same across processes and hosts."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=True))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little") >> 1


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
