"""The KV block hash chain: names a full block of tokens by (parent block hash, its token ids and
the multimodal items it overlaps).

The engine's prefix cache and the router's prefix index (Redis) key blocks by these hashes, so
both import them from here. Pure Python (no numpy): the same bytes on every host.

An image's placeholder tokens are the same id whatever the image, so a block that overlaps an
image also mixes in the image's content hash and where the image starts relative to the block:
two different images of the same size never share KV, and the same image at the same place does.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

NO_HASH = -1

# (offset of the item's first placeholder token in the sequence, its number of tokens, content hash)
MMSpan = tuple[int, int, int]


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: Sequence[int] = ()) -> int:
    """Stable 63-bit hash of (parent block hash, token ids, extra keys): the same across processes
    and hosts. With no extra keys the bytes hashed are those of a text-only block."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=True))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra:
        h.update(b"mm")
        h.update(struct.pack(f"<{len(extra)}q", *extra))
    return int.from_bytes(h.digest(), "little") >> 1


def block_extra_keys(mm_spans: Sequence[MMSpan], start: int, end: int) -> tuple[int, ...]:
    """Extra keys of the block of tokens [start, end): (content hash, item offset - start) of each
    item overlapping it, in order."""
    keys: list[int] = []
    for offset, length, content_hash in mm_spans:
        if offset < end and offset + length > start:
            keys.extend((content_hash, offset - start))
    return tuple(keys)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, mm_spans: Sequence[MMSpan] = ()) -> list[int]:
    """Hash chain of the full blocks of `token_ids` (a trailing partial block has no hash)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = list(token_ids)
    hashes: list[int] = []
    parent = NO_HASH
    for i in range(len(tokens) // block_size):
        start, end = i * block_size, (i + 1) * block_size
        parent = hash_block(parent, tokens[start:end], block_extra_keys(mm_spans, start, end))
        hashes.append(parent)
    return hashes
