"""Paged KV block pool with a prefix cache.

Every full block of a sequence is named by a hash chain over its tokens (hash of the parent
block's hash and this block's token ids), so two sequences with the same prefix map to the same
physical blocks. Blocks carry reference counts; a block whose count drops to zero goes to the
tail of the free queue but keeps its hash, so a later request can revive it. Allocation takes
from the head of the queue (least recently freed) and evicts whatever hash it carried.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.request import Request
from pdcommon.block_hash import NO_HASH, MMSpan, block_extra_keys, hash_block  # noqa: F401 - re-exported


class BlockManager:
    """Owns the block pool: `lookup_prefix / can_allocate / allocate / cache_full_blocks / free`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash = [NO_HASH] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in LRU order (insertion order = time freed). Values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0
        self.prefix_hits = 0  # counted in blocks

    # ----- queries -----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def lookup_prefix(self, token_ids: list[int], mm_spans: Sequence[MMSpan] = ()) -> tuple[list[int], list[int]]:
        """Cached blocks covering a prefix of `token_ids`: (block ids, their hashes). Blocks that
        overlap a multimodal item are keyed by its content too (`mm_spans`).

        The last token is never served from cache: a request must compute at least one token
        to produce logits.
        """
        if not self.enable_prefix_caching:
            return [], []
        ids: list[int] = []
        hashes: list[int] = []
        parent = NO_HASH
        max_blocks = (len(token_ids) - 1) // self.block_size
        bs = self.block_size
        for i in range(max_blocks):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs], block_extra_keys(mm_spans, i * bs, (i + 1) * bs))
            block = self.hash_to_block.get(h)
            if block is None:
                break
            ids.append(block)
            hashes.append(h)
            parent = h
        return ids, hashes

    def record_prefix_lookup(self, num_tokens: int, num_hit_blocks: int) -> None:
        """Count a lookup once its request was admitted (a blocked head retries every step)."""
        if self.enable_prefix_caching:
            self.prefix_queries += (num_tokens - 1) // self.block_size
            self.prefix_hits += num_hit_blocks

    def num_new_blocks(self, req: Request, num_total_tokens: int, cached: list[int] = ()) -> int:
        have = len(req.block_ids) + len(cached)
        return max(0, self.blocks_needed(num_total_tokens) - have)

    def can_allocate(self, req: Request, num_total_tokens: int, cached: list[int] = ()) -> bool:
        # Cached blocks sitting in the free queue are taken out of it when touched.
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        return self.num_new_blocks(req, num_total_tokens, cached) + revived <= self.num_free_blocks

    # ----- mutations -----
    def allocate(self, req: Request, num_total_tokens: int, cached: list[int] = (), cached_hashes: list[int] = ()) -> bool:
        """Give `req` blocks for `num_total_tokens` tokens, reusing `cached` prefix blocks first."""
        if not self.can_allocate(req, num_total_tokens, cached):
            return False
        for b in cached:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        req.block_ids.extend(cached)
        req.block_hashes.extend(cached_hashes)
        for _ in range(self.num_new_blocks(req, num_total_tokens)):
            req.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h != NO_HASH:
            # Evict: the cached content is about to be overwritten.
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = NO_HASH
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        tokens = req.all_token_ids
        bs = self.block_size
        while len(req.block_hashes) < num_full:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else NO_HASH
            h = hash_block(parent, tokens[i * bs : (i + 1) * bs], block_extra_keys(req.mm_spans, i * bs, (i + 1) * bs))
            req.block_hashes.append(h)
            block = req.block_ids[i]
            if self.block_hash[block] == NO_HASH and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block

    def free(self, req: Request) -> None:
        """Drop `req`'s references; its blocks stay cached until evicted. Tail blocks go first."""
        for block in reversed(req.block_ids):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} of request {req.request_id!r} freed twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        req.block_ids = []
        req.block_hashes = []

    def reset_prefix_cache(self) -> None:
        for block in self.free_queue:
            self.block_hash[block] = NO_HASH
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_counts[b] > 0}
