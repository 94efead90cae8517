"""BlockManager: hash chain, prefix lookup, ref counts, LRU eviction, allocation accounting.

Pure bookkeeping tests: no model, no forward pass. Every test ends with `assert_no_leaks`.
"""
from __future__ import annotations

import itertools

import pytest

from engine.block_manager import NO_HASH, BlockManager, hash_block
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()
_fresh_tokens = itertools.count(1000)


# ----- builders -----
def make_bm(num_blocks: int = 8, block_size: int = BS, enable_prefix_caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks, block_size, enable_prefix_caching)


def make_request(tokens: int | list[int], rid: str | None = None, max_tokens: int = 16) -> Request:
    """`tokens`: a token list, or a count (then fresh tokens no other request shares)."""
    toks = [next(_fresh_tokens) for _ in range(tokens)] if isinstance(tokens, int) else list(tokens)
    return Request(rid or f"r{next(_ids)}", toks, SamplingParams(max_tokens=max_tokens))


def admit(bm: BlockManager, req: Request) -> int:
    """What the scheduler does for a whole-prompt prefill: look up, allocate, compute, cache.

    Returns the number of blocks served from the prefix cache."""
    cached, hashes = bm.lookup_prefix(req.all_token_ids)
    assert bm.allocate(req, req.num_tokens, cached, hashes)
    bm.record_prefix_lookup(req.num_tokens, len(cached))
    req.num_cached_tokens = len(cached) * bm.block_size
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)
    return len(cached)


def hits(bm: BlockManager, tokens: list[int]) -> int:
    """Cached blocks a lookup would serve (leaves the hit counters untouched)."""
    q, h = bm.prefix_queries, bm.prefix_hits
    n = len(bm.lookup_prefix(tokens)[0])
    bm.prefix_queries, bm.prefix_hits = q, h
    return n


def assert_consistent(bm: BlockManager) -> None:
    assert all(c >= 0 for c in bm.ref_counts)
    assert set(bm.free_queue) == {b for b, c in enumerate(bm.ref_counts) if c == 0}
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    for b, h in enumerate(bm.block_hash):
        if h != NO_HASH:
            assert bm.hash_to_block.get(h) == b


def assert_no_leaks(bm: BlockManager) -> None:
    assert_consistent(bm)
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.usage == 0.0


# ----- hash chain -----
def test_hash_chain_is_stable_and_depends_on_parent():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    h_a = hash_block(NO_HASH, a)
    assert h_a == hash_block(NO_HASH, tuple(a)) == hash_block(NO_HASH, list(a))
    assert 0 <= h_a < 2**63 and h_a != NO_HASH
    # Same tokens, different parent (i.e. a different position or a different prefix): different hash.
    h_b = hash_block(NO_HASH, b)
    assert hash_block(h_b, a) != h_a
    assert hash_block(h_a, b) != h_b
    assert hash_block(h_a, b) != hash_block(h_b, a)
    # Token order matters.
    assert hash_block(NO_HASH, [4, 3, 2, 1]) != h_a

    bm = make_bm()
    r = make_request(a + b + [9])
    admit(bm, r)
    assert r.block_hashes == [h_a, hash_block(h_a, b)]
    bm.free(r)
    assert_no_leaks(bm)


def test_same_block_tokens_at_another_position_miss():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    bm = make_bm()
    r1 = make_request(a + b + [9])
    admit(bm, r1)
    # `b` is cached, but only as the block after `a`.
    assert hits(bm, b + a + [9]) == 0
    assert hits(bm, [0, 0, 0, 0] + b + [9]) == 0
    assert hits(bm, a + b + [9]) == 2
    bm.free(r1)
    assert_no_leaks(bm)


# ----- lookup_prefix -----
@pytest.mark.parametrize(
    "n_tokens, expected",
    [(1, 0), (4, 0), (5, 1), (7, 1), (8, 1), (9, 2), (12, 2), (13, 3)],
)
def test_lookup_never_serves_the_block_holding_the_last_token(n_tokens, expected):
    bm = make_bm(num_blocks=8)
    base = list(range(100, 116))  # 4 full blocks
    r = make_request(base + [1])
    admit(bm, r)
    assert hits(bm, base[:n_tokens]) == expected
    bm.free(r)
    assert_no_leaks(bm)


def test_exactly_two_full_blocks_get_at_most_one_cached_block():
    bm = make_bm(num_blocks=8)
    r1 = make_request(8)
    admit(bm, r1)
    assert len(r1.block_hashes) == 2  # both blocks are full and computed, so both are cached
    r2 = make_request(list(r1.all_token_ids))
    assert admit(bm, r2) == 1
    assert r2.num_cached_tokens == 4
    assert r2.block_ids[0] == r1.block_ids[0]
    assert r2.block_ids[1] != r1.block_ids[1]
    bm.free(r1)
    bm.free(r2)
    assert_no_leaks(bm)


def test_lookup_counts_queries_and_hits():
    bm = make_bm()
    r1 = make_request(9)
    admit(bm, r1)
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 0)
    probe = r1.all_token_ids[:8] + [7, 7, 7, 7, 7]  # 3 queryable, 2 hit
    cached, _ = bm.lookup_prefix(probe)
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 0)  # a lookup alone is not counted
    bm.record_prefix_lookup(len(probe), len(cached))
    assert (bm.prefix_queries, bm.prefix_hits) == (5, 2)
    bm.free(r1)
    assert_no_leaks(bm)


# ----- sharing and ref counts -----
def test_shared_prefix_blocks_are_ref_counted_and_not_reused_while_referenced():
    bm = make_bm(num_blocks=6)
    prefix = list(range(200, 208))
    r1 = make_request(prefix + [1, 2])
    r2 = make_request(prefix + [3])
    admit(bm, r1)
    assert admit(bm, r2) == 2
    shared = r1.block_ids[:2]
    assert r2.block_ids[:2] == shared
    assert [bm.ref_counts[b] for b in shared] == [2, 2]
    assert bm.ref_counts[r1.block_ids[2]] == 1 and bm.ref_counts[r2.block_ids[2]] == 1
    assert bm.num_free_blocks == 6 - 4

    # Exhaust the pool: the shared blocks are never handed out.
    others = []
    while bm.can_allocate(probe := make_request(4), 4):
        assert bm.allocate(probe, 4)
        others.append(probe)
    assert len(others) == 2 and bm.num_free_blocks == 0
    assert not set(shared) & {b for o in others for b in o.block_ids}

    bm.free(r1)
    assert [bm.ref_counts[b] for b in shared] == [1, 1]
    assert not set(shared) & set(bm.free_queue)
    bm.free(r2)
    assert [bm.ref_counts[b] for b in shared] == [0, 0]
    assert set(shared) <= set(bm.free_queue)
    for o in others:
        bm.free(o)
    assert_no_leaks(bm)


def test_freed_blocks_stay_cached_until_evicted():
    bm = make_bm(num_blocks=4)
    r1 = make_request(9)  # 3 blocks, 2 of them full and cached
    admit(bm, r1)
    held = list(r1.block_ids)
    bm.free(r1)
    assert r1.block_ids == [] and r1.block_hashes == []
    assert hits(bm, r1.all_token_ids) == 2

    # A later request with the same prefix revives the very same blocks.
    r2 = make_request(r1.all_token_ids[:8] + [5, 6, 7])
    assert admit(bm, r2) == 2
    assert r2.block_ids[:2] == held[:2]
    assert r2.num_cached_tokens == 8
    bm.free(r2)

    # Evict everything: a request using the whole pool overwrites every cached block.
    r3 = make_request(16)
    admit(bm, r3)
    assert hits(bm, r1.all_token_ids) == 0
    bm.free(r3)
    assert_no_leaks(bm)


def test_sharing_within_one_step_registers_one_copy():
    """Two identical prompts computed concurrently: only the first copy is registered, nothing breaks."""
    bm = make_bm(num_blocks=8)
    toks = list(range(300, 309))
    r1, r2 = make_request(toks), make_request(toks)
    for r in (r1, r2):  # both looked up before either was computed
        assert bm.allocate(r, r.num_tokens, *bm.lookup_prefix(r.all_token_ids))
    for r in (r1, r2):
        r.num_computed_tokens = r.num_tokens
        bm.cache_full_blocks(r)
    assert r1.block_hashes == r2.block_hashes
    assert bm.hash_to_block[r1.block_hashes[0]] == r1.block_ids[0]
    assert bm.block_hash[r2.block_ids[0]] == NO_HASH
    assert_consistent(bm)
    bm.free(r1)
    bm.free(r2)
    assert hits(bm, toks) == 2
    assert_no_leaks(bm)


# ----- cache_full_blocks -----
def test_only_full_computed_blocks_are_cached():
    bm = make_bm()
    r = make_request(10)
    assert bm.allocate(r, 10)
    r.num_computed_tokens = 3
    bm.cache_full_blocks(r)
    assert r.block_hashes == []
    r.num_computed_tokens = 6  # chunked prefill: 1 full block so far
    bm.cache_full_blocks(r)
    assert len(r.block_hashes) == 1
    r.num_computed_tokens = 10
    r.append_token(1)  # 11 tokens, 10 computed
    r.append_token(2)  # 12 tokens: block 2 is full of tokens but the last 2 are not computed
    bm.cache_full_blocks(r)
    assert len(r.block_hashes) == 2
    assert hits(bm, r.all_token_ids + [3]) == 2
    bm.free(r)
    assert_no_leaks(bm)


# ----- LRU eviction -----
def test_eviction_takes_never_used_blocks_then_tail_blocks_before_head_blocks():
    bm = make_bm(num_blocks=6)
    r1 = make_request(13)  # 4 blocks, 3 full and cached
    admit(bm, r1)
    head_to_tail = list(r1.block_ids)
    bm.free(r1)
    # Never-used blocks first, then r1's blocks tail first.
    assert list(bm.free_queue) == [4, 5] + head_to_tail[::-1]
    probe = r1.all_token_ids  # 3 queryable full blocks
    assert hits(bm, probe) == 3

    taken = []
    for expected_hits in (3, 3, 3, 2, 1, 0):  # unused, unused, partial tail, then cached blocks tail first
        t = make_request(1)
        assert bm.allocate(t, 1)
        taken.append(t)
        assert hits(bm, probe) == expected_hits
    assert [t.block_ids[0] for t in taken] == [4, 5] + head_to_tail[::-1]
    for t in taken:
        bm.free(t)
    assert_no_leaks(bm)


def test_least_recently_freed_request_is_evicted_first():
    bm = make_bm(num_blocks=4)
    r1, r2 = make_request(5), make_request(5)  # 2 blocks each, 1 cached
    admit(bm, r1)
    admit(bm, r2)
    bm.free(r1)
    bm.free(r2)
    assert hits(bm, r1.all_token_ids) == 1 and hits(bm, r2.all_token_ids) == 1
    t = make_request(8)
    assert bm.allocate(t, 8)  # takes r1's two blocks: r1 was freed first
    assert hits(bm, r1.all_token_ids) == 0
    assert hits(bm, r2.all_token_ids) == 1
    bm.free(t)
    assert_no_leaks(bm)


def test_reviving_a_cached_block_refreshes_its_lru_position():
    bm = make_bm(num_blocks=4)
    r1, r2 = make_request(5), make_request(5)
    admit(bm, r1)
    admit(bm, r2)
    bm.free(r1)
    bm.free(r2)
    # r3 reuses r1's cached head block, then is freed: now r2's blocks are the oldest.
    r3 = make_request(r1.all_token_ids[:4] + [42])
    assert admit(bm, r3) == 1
    bm.free(r3)
    t = make_request(8)
    assert bm.allocate(t, 8)
    assert hits(bm, r2.all_token_ids) == 0
    assert hits(bm, r1.all_token_ids) == 1
    bm.free(t)
    assert_no_leaks(bm)


# ----- can_allocate / allocate -----
def test_can_allocate_counts_cached_blocks_taken_out_of_the_free_queue():
    bm = make_bm(num_blocks=4)
    r1 = make_request(9)  # blocks 0..2, 2 of them cached
    admit(bm, r1)
    bm.free(r1)
    assert bm.num_free_blocks == 4

    # 13 tokens = 4 blocks: 2 cached (revived from the free queue) + 2 new = 4 free blocks used.
    fits = make_request(r1.all_token_ids[:8] + [1, 2, 3, 4, 5])
    cached, hashes = bm.lookup_prefix(fits.all_token_ids)
    assert len(cached) == 2
    assert bm.can_allocate(fits, 13, cached)
    # 17 tokens = 5 blocks: 2 revived + 3 new > 4 free, although only 3 are "new".
    too_big = make_request(r1.all_token_ids[:8] + list(range(9)))
    cached2, hashes2 = bm.lookup_prefix(too_big.all_token_ids)
    assert len(cached2) == 2
    assert bm.num_new_blocks(too_big, 17, cached2) == 3
    assert not bm.can_allocate(too_big, 17, cached2)
    assert not bm.allocate(too_big, 17, cached2, hashes2)
    assert too_big.block_ids == [] and too_big.block_hashes == []
    assert bm.num_free_blocks == 4 and hits(bm, r1.all_token_ids) == 2

    assert bm.allocate(fits, 13, cached, hashes)
    assert bm.num_free_blocks == 0
    bm.free(fits)
    assert_no_leaks(bm)


def test_can_allocate_with_cached_blocks_already_referenced_costs_nothing_extra():
    bm = make_bm(num_blocks=4)
    r1 = make_request(9)
    admit(bm, r1)  # holds 3 blocks, 1 free
    r2 = make_request(r1.all_token_ids[:8] + [1])  # 2 blocks shared with r1 (ref > 0) + 1 new
    cached, hashes = bm.lookup_prefix(r2.all_token_ids)
    assert len(cached) == 2
    assert bm.can_allocate(r2, 9, cached)
    assert bm.allocate(r2, 9, cached, hashes)
    assert bm.num_free_blocks == 0
    bm.free(r2)
    bm.free(r1)
    assert_no_leaks(bm)


def test_failed_allocate_changes_nothing():
    bm = make_bm(num_blocks=3)
    r1 = make_request(5)
    admit(bm, r1)
    before = (list(bm.ref_counts), list(bm.free_queue), dict(bm.hash_to_block))
    r2 = make_request(9)
    assert not bm.allocate(r2, 9)
    assert (list(bm.ref_counts), list(bm.free_queue), dict(bm.hash_to_block)) == before
    assert r2.block_ids == []
    bm.free(r1)
    assert_no_leaks(bm)


def test_allocate_grows_a_request_incrementally():
    bm = make_bm(num_blocks=4)
    r = make_request(3)
    assert bm.allocate(r, 3) and len(r.block_ids) == 1
    assert bm.allocate(r, 4) and len(r.block_ids) == 1
    assert bm.allocate(r, 5) and len(r.block_ids) == 2
    assert bm.allocate(r, 16) and len(r.block_ids) == 4
    assert len(set(r.block_ids)) == 4
    assert not bm.allocate(r, 17) and len(r.block_ids) == 4
    bm.free(r)
    assert_no_leaks(bm)


# ----- prefix caching disabled -----
def test_prefix_caching_disabled_never_hits():
    bm = make_bm(num_blocks=8, enable_prefix_caching=False)
    r1 = make_request(13)
    assert admit(bm, r1) == 0
    assert r1.block_hashes == [] and bm.hash_to_block == {}
    r2 = make_request(list(r1.all_token_ids))
    assert admit(bm, r2) == 0
    assert not set(r1.block_ids) & set(r2.block_ids)
    bm.free(r1)
    bm.free(r2)
    assert bm.lookup_prefix(r1.all_token_ids) == ([], [])
    assert all(h == NO_HASH for h in bm.block_hash)
    assert_no_leaks(bm)


# ----- reset_prefix_cache -----
def test_reset_prefix_cache_drops_only_free_blocks_entries():
    bm = make_bm(num_blocks=8)
    freed, held = make_request(9), make_request(9)
    admit(bm, freed)
    admit(bm, held)
    bm.free(freed)
    bm.reset_prefix_cache()
    assert hits(bm, freed.all_token_ids) == 0
    assert hits(bm, held.all_token_ids) == 2  # still referenced: kept
    assert all(bm.block_hash[b] == NO_HASH for b in bm.free_queue)
    assert_consistent(bm)
    # The kept entries remain cached after their owner is freed.
    bm.free(held)
    assert hits(bm, held.all_token_ids) == 2
    bm.reset_prefix_cache()
    assert hits(bm, held.all_token_ids) == 0
    assert bm.hash_to_block == {}
    assert_no_leaks(bm)


# ----- double free -----
def test_freeing_a_request_twice_is_a_no_op():
    bm = make_bm(num_blocks=4)
    r1, r2 = make_request(9), make_request(4)
    admit(bm, r1)
    admit(bm, r2)
    bm.free(r1)
    bm.free(r1)  # block_ids were cleared: nothing is released twice
    assert sum(bm.ref_counts) == 1 and bm.ref_counts[r2.block_ids[0]] == 1
    bm.free(r2)
    assert_no_leaks(bm)


def test_double_free_of_a_block_is_caught():
    bm = make_bm(num_blocks=4)
    r1 = make_request(5)
    admit(bm, r1)
    stale = list(r1.block_ids)
    bm.free(r1)
    alias = make_request(5)
    alias.block_ids = stale  # a stale second owner of already-freed blocks
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(alias)
    # The check fires before decrementing, so the pool is left intact.
    assert min(bm.ref_counts) == 0
    assert_no_leaks(bm)


def test_blocks_needed_and_usage():
    bm = make_bm(num_blocks=4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    r = make_request(5)
    assert bm.allocate(r, 5)
    assert bm.usage == 0.5
    bm.free(r)
    assert_no_leaks(bm)
