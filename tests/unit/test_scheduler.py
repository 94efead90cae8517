"""Scheduler: token budget, chunked prefill, max_num_seqs, decode, preemption, prefix-cache hits.

Pure bookkeeping tests: no model. A step is simulated as schedule -> (read `samples`) ->
update_after_step -> append a fake token to every request that completed all its known tokens.
A fake KV store records which token each (block, slot) holds, so every step also checks that
the tokens a request treats as computed (prefix-cache hits, recompute after preemption) really
are in its blocks, and that nobody writes into a block someone else shares or the cache holds.
Every test ends with `assert_no_leaks`.
"""
from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

_ids = itertools.count()
_fresh_tokens = itertools.count(1000)


# ----- builders -----
def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, 4096), bm)


def make_request(tokens: int | list[int], rid: str | None = None, max_tokens: int = 4) -> Request:
    """`tokens`: a token list, or a count (then fresh tokens no other request shares)."""
    toks = [next(_fresh_tokens) for _ in range(tokens)] if isinstance(tokens, int) else list(tokens)
    return Request(rid or f"r{next(_ids)}", toks, SamplingParams(max_tokens=max_tokens))


def assert_no_leaks(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.waiting and not sched.running, (sched.waiting, sched.running)
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.num_free_blocks == bm.num_blocks
    assert set(bm.free_queue) == set(range(bm.num_blocks))


class Sim:
    """Drives a scheduler like the engine does, checking invariants every step."""

    def __init__(self, sched: Scheduler, auto_finish: bool = True) -> None:
        self.sched = sched
        self.bm = sched.block_manager
        self.auto_finish = auto_finish
        self.kv: dict[tuple[int, int], int] = {}  # (block, slot) -> token id whose KV it holds
        self.finished: list[Request] = []
        self.steps = 0

    def add(self, *reqs: Request) -> None:
        for r in reqs:
            self.sched.add(r)

    def _slot(self, req: Request, pos: int) -> tuple[int, int]:
        return req.block_ids[pos // self.bm.block_size], pos % self.bm.block_size

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        sched, bm, cfg = self.sched, self.bm, self.sched.config
        out = sched.schedule()
        self.steps += 1
        sampled = [s.request for s in out.scheduled if s.samples]  # before update_after_step

        # --- invariants of the schedule ---
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        reqs = [s.request for s in out.scheduled]
        assert len(set(map(id, reqs))) == len(reqs), "a request scheduled twice"
        for s in out.scheduled:
            r = s.request
            assert s.num_new_tokens >= 1
            assert r in sched.running and r.status is RequestStatus.RUNNING
            assert r.num_computed_tokens + s.num_new_tokens <= r.num_tokens
            assert len(r.block_ids) >= bm.blocks_needed(r.num_computed_tokens + s.num_new_tokens)
        for p in out.preempted:
            assert p in sched.waiting and p not in sched.running and p not in reqs
            assert p.block_ids == [] and p.num_computed_tokens == 0 and p.status is RequestStatus.WAITING
        self.check_pool()

        # --- fake forward: computed tokens must be in the blocks; new ones are written ---
        for s in out.scheduled:
            r = s.request
            for pos in range(r.num_computed_tokens):
                assert self.kv.get(self._slot(r, pos)) == r.all_token_ids[pos], (r, pos)
            for pos in range(r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens):
                block, slot = self._slot(r, pos)
                assert bm.ref_counts[block] == 1, f"{r} writes into shared block {block}"
                assert bm.block_hash[block] == -1, f"{r} overwrites cached block {block}"
                self.kv[(block, slot)] = r.all_token_ids[pos]

        sched.update_after_step(out)
        done = [s.request for s in out.scheduled if s.request.num_computed_tokens == s.request.num_tokens]
        assert done == sampled
        for r in sampled:
            r.append_token(5000 + r.num_output_tokens)
            if self.auto_finish and r.num_output_tokens >= r.params.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
                self.finished.append(r)
        self.check_pool()
        return out, sampled

    def check_pool(self) -> None:
        bm, sched = self.bm, self.sched
        owners = Counter(b for r in list(sched.running) + list(sched.waiting) for b in r.block_ids)
        assert all(bm.ref_counts[b] == owners.get(b, 0) for b in range(bm.num_blocks)), "ref counts drifted"
        assert set(bm.free_queue) == {b for b in range(bm.num_blocks) if bm.ref_counts[b] == 0}
        for r in sched.running:
            assert len(set(r.block_ids)) == len(r.block_ids)

    def run(self, max_steps: int = 1000) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_work:
            assert self.steps < max_steps, "no progress"
            out, _ = self.step()
            assert not out.empty, "nothing scheduled although work is queued"
            outs.append(out)
        return outs


# ----- token budget -----
def test_token_budget_is_respected_every_step():
    sched = make_scheduler(num_blocks=128, max_num_batched_tokens=10, max_num_seqs=16)
    sim = Sim(sched)
    reqs = [make_request(n, max_tokens=m) for n, m in [(3, 5), (17, 2), (8, 8), (1, 3), (26, 1), (9, 4)]]
    sim.add(*reqs)
    outs = sim.run()
    assert all(o.num_tokens <= 10 for o in outs)
    assert max(o.num_tokens for o in outs) == 10  # the budget is actually used up
    assert len(sim.finished) == len(reqs)
    assert all(r.num_output_tokens == r.params.max_tokens for r in reqs)
    assert_no_leaks(sched)


# ----- chunked prefill -----
def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_last_chunk():
    sched = make_scheduler(max_num_batched_tokens=8)
    sim = Sim(sched)
    r = make_request(25, max_tokens=3)
    sim.add(r)
    chunks, samples = [], []
    for _ in range(4):
        out, sampled = sim.step()
        (s,) = out.scheduled
        chunks.append(s.num_new_tokens)
        samples.append(bool(sampled))
    assert chunks == [8, 8, 8, 1]
    assert samples == [False, False, False, True]
    assert r.num_output_tokens == 1 and r.num_computed_tokens == 25
    # Then decode, one token a step.
    out, _ = sim.step()
    assert [s.num_new_tokens for s in out.scheduled] == [1]
    sim.run()
    assert r.num_output_tokens == 3
    assert_no_leaks(sched)


def test_samples_must_be_read_before_update_after_step():
    sched = make_scheduler()
    r = make_request(5)
    sched.add(r)
    out = sched.schedule()
    assert out.scheduled[0].samples
    sched.update_after_step(out)
    assert not out.scheduled[0].samples  # computed counts moved on
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


# ----- max_num_seqs -----
def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    sim = Sim(sched)
    reqs = [make_request(3, max_tokens=3 + i) for i in range(5)]
    sim.add(*reqs)
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == reqs[:2]
    assert list(sched.waiting) == reqs[2:]
    outs = [out] + sim.run()
    assert all(len(o.scheduled) <= 2 for o in outs)
    # r2 is admitted only once r0 (max_tokens=3) is done.
    first_seen = {id(s.request): i for i, o in reversed(list(enumerate(outs))) for s in o.scheduled}
    assert first_seen[id(reqs[2])] == 3
    assert len(sim.finished) == 5
    assert_no_leaks(sched)


# ----- running before waiting -----
def test_running_requests_are_served_before_waiting_ones():
    sched = make_scheduler(max_num_batched_tokens=8)
    sim = Sim(sched, auto_finish=False)
    r0 = make_request(20)
    sim.add(r0)
    sim.step()  # r0: 8 of 20
    r1 = make_request(4)
    sim.add(r1)
    out, _ = sim.step()  # r0 takes the whole budget, r1 keeps waiting
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 8)]
    assert list(sched.waiting) == [r1]
    out, _ = sim.step()  # r0's last 4, then r1's 4
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 4), (r1, 4)]
    r2 = make_request(30)
    sim.add(r2)
    out, _ = sim.step()  # two decodes first, r2 gets what is left
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 1), (r1, 1), (r2, 6)]
    for r in (r0, r1, r2):
        sched.finish(r, RequestStatus.FINISHED_STOPPED)
    assert_no_leaks(sched)


def test_decode_requests_get_exactly_one_token_per_step():
    sched = make_scheduler(max_num_batched_tokens=64)
    sim = Sim(sched)
    reqs = [make_request(n, max_tokens=6) for n in (2, 5, 9)]
    sim.add(*reqs)
    out, sampled = sim.step()
    assert [s.num_new_tokens for s in out.scheduled] == [2, 5, 9] and sampled == reqs
    for _ in range(5):
        out, sampled = sim.step()
        assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r, 1) for r in reqs]
        assert sampled == reqs
    assert all(r.num_output_tokens == 6 for r in reqs)
    assert_no_leaks(sched)


# ----- preemption -----
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_frees_the_newest_request_which_is_recomputed_later(prefix_caching):
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64, enable_prefix_caching=prefix_caching)
    sim = Sim(sched)
    r0 = make_request(8, max_tokens=3)  # 2 full blocks; its first decode needs a 3rd
    r1 = make_request(5, max_tokens=3)  # 2 blocks
    sim.add(r0, r1)
    out, _ = sim.step()
    assert len(out.scheduled) == 2 and sched.block_manager.num_free_blocks == 0

    out, _ = sim.step()
    assert out.preempted == (r1,)
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 1)]
    assert list(sched.waiting) == [r1] and sched.running == [r0]
    assert r1.num_preemptions == 1 and sched.num_preemptions == 1
    assert r1.num_output_tokens == 1  # the token sampled before preemption is kept

    out, _ = sim.step()  # r0 decodes its 3rd token and finishes; r1 did not fit in that step
    assert [s.request for s in out.scheduled] == [r0]
    assert r0 in sim.finished and list(sched.waiting) == [r1]

    out, sampled = sim.step()  # r1 recomputes its 6 tokens (5 prompt + 1 output)
    (s,) = out.scheduled
    assert s.request is r1 and sampled == [r1]
    # With prefix caching its first (full, computed) block survived in the cache.
    assert s.num_new_tokens == (2 if prefix_caching else 6)
    assert r1.num_cached_tokens == 0  # recorded on first admission only
    assert r1.num_output_tokens == 2  # one new token, not a resample of the first
    sim.run()
    assert r1 in sim.finished and r1.num_output_tokens == 3
    assert_no_leaks(sched)


def test_most_recently_admitted_requests_are_preempted_first_and_keep_their_order():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    sim = Sim(sched)
    reqs = [make_request(4, max_tokens=3) for _ in range(4)]  # each exactly 1 full block
    sim.add(*reqs)
    sim.step()
    out, _ = sim.step()  # every decode needs a 2nd block: r0 evicts r3, r1 evicts r2
    assert out.preempted == (reqs[3], reqs[2])
    assert [s.request for s in out.scheduled] == reqs[:2]
    assert list(sched.waiting) == [reqs[2], reqs[3]]  # arrival order kept at the front
    sim.run()
    assert sorted(r.request_id for r in sim.finished) == sorted(r.request_id for r in reqs)
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert_no_leaks(sched)


def test_preempted_request_goes_before_older_waiting_requests():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64, max_num_seqs=2)
    sim = Sim(sched)
    r0, r1, r2 = make_request(8, max_tokens=2), make_request(5, max_tokens=2), make_request(1, max_tokens=1)
    sim.add(r0, r1, r2)
    sim.step()  # r0, r1 admitted (max_num_seqs=2); r2 waits
    out, _ = sim.step()
    assert out.preempted == (r1,)
    assert list(sched.waiting) == [r1, r2]
    sim.run()
    assert len(sim.finished) == 3
    assert_no_leaks(sched)


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=4, enable_prefix_caching=False)
    sim = Sim(sched, auto_finish=False)
    r0 = make_request(4)
    sim.add(r0)
    sim.step()  # r0: 4 tokens, 1 block
    r1 = make_request(10)
    sim.add(r1)
    sim.step()  # r0 decode (2 blocks); r1 chunk of 3 (1 block)
    sim.step()  # r0 decode; r1 chunk of 3 (2 blocks): pool full
    assert sched.block_manager.num_free_blocks == 0
    out, _ = sim.step()  # r1's next chunk needs a 3rd block: it preempts itself
    assert out.preempted == (r1,)
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 1)]
    # r1 would fit again now (2 free blocks, 3 budget left) but must wait for the next step.
    assert sched.block_manager.num_free_blocks == 2
    assert list(sched.waiting) == [r1] and sched.running == [r0]
    out, _ = sim.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 1), (r1, 3)]
    assert r1.num_computed_tokens == 3 and r1.num_preemptions == 1
    for r in (r0, r1):
        sched.finish(r, RequestStatus.FINISHED_STOPPED)
    assert_no_leaks(sched)


# ----- prefix cache -----
def test_prefix_cache_hit_sets_cached_tokens_and_schedules_only_the_tail():
    sched = make_scheduler(num_blocks=16)
    sim = Sim(sched)
    prefix = list(range(10, 20))  # 2 full blocks + 2
    r0 = make_request(prefix, max_tokens=2)
    sim.add(r0)
    sim.run()
    r1 = make_request(prefix[:8] + [7, 7, 7], max_tokens=2)
    sim.add(r1)
    out, _ = sim.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r1, 3)]
    assert r1.num_cached_tokens == 8
    sim.run()
    assert sched.block_manager.prefix_hits == 2
    assert_no_leaks(sched)


def test_prefix_shared_with_a_running_request():
    sched = make_scheduler(num_blocks=16)
    sim = Sim(sched, auto_finish=False)
    prefix = list(range(10, 22))  # 3 full blocks
    r0 = make_request(prefix + [1])
    sim.add(r0)
    sim.step()
    r1 = make_request(prefix + [2, 3])
    sim.add(r1)
    out, _ = sim.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(r0, 1), (r1, 2)]
    assert r1.num_cached_tokens == 12
    assert r1.block_ids[:3] == r0.block_ids[:3]
    assert [sched.block_manager.ref_counts[b] for b in r0.block_ids[:3]] == [2, 2, 2]
    for r in (r0, r1):
        sched.finish(r, RequestStatus.FINISHED_STOPPED)
    assert_no_leaks(sched)


def test_prefix_caching_disabled_computes_everything():
    sched = make_scheduler(num_blocks=16, enable_prefix_caching=False)
    sim = Sim(sched)
    prefix = list(range(10, 20))
    sim.add(make_request(prefix, max_tokens=1))
    sim.run()
    r1 = make_request(prefix, max_tokens=1)
    sim.add(r1)
    out, _ = sim.step()
    assert out.scheduled[0].num_new_tokens == 10 and r1.num_cached_tokens == 0
    assert_no_leaks(sched)


# ----- requests that cannot fit -----
@pytest.mark.timeout(10)
def test_prompt_larger_than_the_pool_does_not_crash_or_spin():
    sched = make_scheduler(num_blocks=2)
    r = make_request(12)
    small = make_request(2)
    sched.add(r)
    sched.add(small)
    for _ in range(3):
        out = sched.schedule()
        assert out.empty and not out.preempted
    assert list(sched.waiting) == [r, small] and not sched.running
    assert sched.block_manager.num_free_blocks == 2
    # The engine ends the head of the queue; the rest then runs.
    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    sim = Sim(sched)
    sim.run()
    assert small in sim.finished
    assert_no_leaks(sched)


@pytest.mark.timeout(10)
def test_request_outgrowing_the_pool_preempts_itself_without_spinning():
    sched = make_scheduler(num_blocks=2)
    sim = Sim(sched)
    r = make_request(7, max_tokens=10)
    sim.add(r)
    sim.step()  # prefill: 7 tokens, 2 blocks
    sim.step()  # 8th token still fits
    out, _ = sim.step()  # the 9th needs a 3rd block
    assert out.empty and out.preempted == (r,)
    assert list(sched.waiting) == [r] and not sched.running
    for _ in range(3):
        out = sched.schedule()
        assert out.empty and not out.preempted
    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    assert_no_leaks(sched)


# ----- finishing -----
def test_finish_from_waiting_and_holding_kv():
    sched = make_scheduler(num_blocks=8)
    sim = Sim(sched, auto_finish=False)
    held, queued = make_request(6), make_request(3)
    sim.add(held)
    sim.step()
    sched.add(queued)
    sched.finish(queued, RequestStatus.FINISHED_ABORTED)  # never scheduled
    assert not sched.waiting
    sched.finish(held, RequestStatus.HOLDING_KV)  # keeps its blocks for export
    assert not sched.running and held.block_ids and sched.block_manager.num_free_blocks == 6
    sched.block_manager.free(held)  # released after export
    assert_no_leaks(sched)


def test_add_running_over_the_seq_limit_waits_with_its_blocks():
    """An imported request (KV already in its blocks) beyond max_num_seqs waits, then resumes."""
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    sim = Sim(sched)
    r0 = make_request(3, max_tokens=2)
    sim.add(r0)
    sim.step()
    imported = make_request(6, max_tokens=2)
    bm = sched.block_manager
    assert bm.allocate(imported, 6)
    for pos in range(6):  # its KV arrives from elsewhere
        sim.kv[sim._slot(imported, pos)] = imported.all_token_ids[pos]
    imported.num_computed_tokens = 6
    bm.cache_full_blocks(imported)
    sched.add_running(imported)
    imported.append_token(4242)
    assert list(sched.waiting) == [imported]
    sim.step()  # r0 finishes
    out, _ = sim.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(imported, 1)]
    sim.run()
    assert imported.num_output_tokens == 2
    assert_no_leaks(sched)


def test_waiting_request_holding_blocks_is_not_starved_by_a_preempted_head():
    """BUG (scheduler.py): a preempted request goes to the front of `waiting`, ahead of an imported
    request that waits (over max_num_seqs) while holding its blocks. The head cannot get blocks
    because the imported request holds them, and the imported request is never tried because
    admission stops at the head: schedule() returns nothing forever, and the engine's
    `_fail_unschedulable` then ends r0 with FINISHED_LENGTH although it needs only 2 of 4 blocks."""
    sched = make_scheduler(num_blocks=4, max_num_seqs=1)
    sim = Sim(sched)
    r0 = make_request(4, max_tokens=3)
    sim.add(r0)
    sim.step()  # r0: 1 block, 5 tokens
    imported = make_request(9, max_tokens=2)
    bm = sched.block_manager
    assert bm.allocate(imported, 9)  # 3 blocks: the pool is full
    for pos in range(9):
        sim.kv[sim._slot(imported, pos)] = imported.all_token_ids[pos]
    imported.num_computed_tokens = 9
    bm.cache_full_blocks(imported)
    sched.add_running(imported)  # max_num_seqs reached: waits with its blocks
    imported.append_token(4242)
    out, _ = sim.step()  # r0 needs a 2nd block: it preempts itself
    assert out.preempted == (r0,)
    # Something must still be schedulable: `imported` needs no new block.
    out, _ = sim.step()
    assert not out.empty, f"stalled: waiting={list(sched.waiting)} free={bm.num_free_blocks}"
    sim.run()
    assert r0 in sim.finished and imported in sim.finished
    assert_no_leaks(sched)


# ----- randomized end-to-end -----
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_workloads_finish_with_consistent_bookkeeping(seed, prefix_caching):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(6, 20)
    sched = make_scheduler(
        num_blocks=num_blocks,
        block_size=bs,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(3, 24),
        enable_prefix_caching=prefix_caching,
    )
    sim = Sim(sched)
    shared = [rng.randrange(50) for _ in range(3 * bs)]
    reqs = []
    for _ in range(12):
        max_tokens = rng.randint(1, 6)
        limit = num_blocks * bs - max_tokens  # every request fits alone in the pool
        n = rng.randint(1, min(limit, 4 * bs))
        toks = (shared[: rng.randint(0, len(shared))] + [rng.randrange(50) for _ in range(n)])[: max(n, 1)]
        reqs.append(make_request(toks, max_tokens=max_tokens))
    pending = list(reqs)
    while pending or sched.has_work:
        for _ in range(rng.randint(0, 2)):
            if pending:
                sim.add(pending.pop(0))
        if sched.has_work:
            out, _ = sim.step()
            assert not out.empty
        assert sim.steps < 2000
    assert len(sim.finished) == len(reqs)
    assert all(r.num_output_tokens == r.params.max_tokens for r in reqs)
    if prefix_caching:
        assert sched.block_manager.prefix_hits <= sched.block_manager.prefix_queries
    assert_no_leaks(sched)


# ----- the encoder budget (images) -----
def _image_request(n_tokens: int, images: list[tuple[int, int, int]], rid: str | None = None) -> Request:
    """A prompt of `n_tokens` with images at (offset, length, content hash), pixels present."""
    import torch

    from engine.multimodal.items import MultiModalItem

    items = tuple(MultiModalItem("image", o, n, (1, 2, 2), h, torch.zeros(4, 3)) for o, n, h in images)
    return Request(rid or f"r{next(_ids)}", [next(_fresh_tokens) for _ in range(n_tokens)],
                   SamplingParams(max_tokens=2), mm_items=items)


def _encoder_sched(encoder_tokens: int, cached: set[int] | None = None, batched: int = 64) -> Scheduler:
    bm = BlockManager(64, 4, True)
    return Scheduler(SchedulerConfig(8, batched, 4096, encoder_tokens), bm,
                     encoder_cached=(cached or set()).__contains__)


def _steps(sched: Scheduler, *reqs: Request) -> list[list[tuple[str, int]]]:
    sim = Sim(sched)
    sim.add(*reqs)
    plan = []
    while sched.has_work:
        out, _ = sim.step()
        plan.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
    assert_no_leaks(sched)
    return plan


def test_a_chunk_stops_before_an_image_the_encoder_has_no_room_for():
    # Two 16-token images; the encoder makes 20 image tokens a step: the second image waits.
    req = _image_request(48, [(4, 16, 1), (24, 16, 2)], "a")
    plan = _steps(_encoder_sched(20), req)
    assert plan[0] == [("a", 24)]  # up to the second image
    assert plan[1] == [("a", 24)]  # the second image and the rest
    # Enough room: one chunk.
    assert _steps(_encoder_sched(32), _image_request(48, [(4, 16, 1), (24, 16, 2)], "b"))[0] == [("b", 48)]


def test_encoder_budget_is_shared_by_the_step_and_cached_images_are_free():
    a = _image_request(20, [(2, 16, 1)], "a")
    b = _image_request(20, [(0, 16, 2)], "b")  # its image is where its prompt starts: it waits a step
    plan = _steps(_encoder_sched(16), a, b)
    assert plan[0] == [("a", 20)] and ("b", 20) in plan[1]
    # The same image twice in one step is encoded once; a cached one takes no budget.
    c, d = _image_request(20, [(2, 16, 7)], "c"), _image_request(20, [(2, 16, 7)], "d")
    assert _steps(_encoder_sched(16), c, d)[0] == [("c", 20), ("d", 20)]
    e, f = _image_request(20, [(2, 16, 8)], "e"), _image_request(20, [(2, 16, 9)], "f")
    assert _steps(_encoder_sched(16, cached={8, 9}), e, f)[0] == [("e", 20), ("f", 20)]


def test_an_image_larger_than_the_encoder_budget_still_runs_alone():
    big = _image_request(40, [(0, 32, 3)], "big")
    other = _image_request(40, [(0, 8, 4)], "other")
    plan = _steps(_encoder_sched(16), big, other)
    assert plan[0] == [("big", 40)]  # alone, never starved
    assert ("other", 40) in plan[1]
    with pytest.raises(ValueError, match="must be >= 1"):
        SchedulerConfig(8, 64, 4096, 0)
