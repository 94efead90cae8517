"""Expert parallelism on the tiny ERNIE-4.5 MoE (8 experts, top-2, one shared expert, float32):
an EP=2 group (this process + one child) gives the tokens of EP=1 and of transformers, records
per-expert counts, and fails fast and cleanly when a rank dies; the same tokens on the tiny
Qwen3-MoE."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.parallel import ExpertPlacement
from engine.parallel.group import EPGroupError
from tests.cluster_harness import pid_alive
from tests.conftest import fuse_experts, run_to_completion
from tests.unit.test_fidelity import GREEDY, prompts_for, reference

KW = dict(dtype="float32", num_kv_blocks=256, max_model_len=512)


def _gone(pid: int) -> bool:
    return not pid_alive(pid)


@pytest.fixture(scope="module")
def moe(tiny_checkpoint):
    return tiny_checkpoint("ernie45_moe")


def test_ep2_greedy_matches_ep1_and_transformers(moe):
    ref = reference(moe, "ernie45_moe")
    single = LLMEngine.from_args(str(moe), **KW)
    assert run_to_completion(single, prompts_for(256), GREEDY) == ref
    # Tiny chunks and blocks: chunked prefills, mixed prefill+decode steps, padded decode tables.
    # Tiny chunks and blocks also with the hidden-state all-to-all dispatch.
    for extra in ({}, dict(enable_prefix_caching=False, max_num_batched_tokens=7, block_size=4, ep_dispatch="alltoall")):
        engine = LLMEngine.from_args(str(moe), expert_parallel_size=2, **KW, **extra)
        pids = engine.runner.group.pids
        try:
            assert engine.runner.model.layers[1].mlp.experts.gate_up.shape[0] == 4  # half the experts
            assert run_to_completion(engine, prompts_for(256), GREEDY) == ref
            assert not engine.leaks()
        finally:
            engine.close()
        assert all(_gone(p) for p in pids)
    # Teacher-forced logits (score) go through the group too.
    engine = LLMEngine.from_args(str(moe), expert_parallel_size=2, **KW)
    try:
        tokens = prompts_for(256)[1]
        torch.testing.assert_close(engine.score(tokens), single.score(tokens), rtol=1e-5, atol=1e-5)
    finally:
        engine.close()


def test_ep2_qwen3_moe_greedy_matches_ep1_and_transformers(tiny_checkpoint, tmp_path):
    """Qwen3-MoE (no shared expert, no correction bias, norm_topk_prob; layer 0 dense) over EP=2,
    also from a checkpoint with fused expert tensors, before and after a rebalance."""
    path = tiny_checkpoint("qwen3_moe")
    ref = reference(path, "qwen3_moe")
    single = LLMEngine.from_args(str(path), **KW)
    assert run_to_completion(single, prompts_for(256), GREEDY) == ref
    for folder in (path, fuse_experts(path, tmp_path)):
        engine = LLMEngine.from_args(str(folder), expert_parallel_size=2, num_redundant_experts=1, **KW)
        pids = engine.runner.group.pids
        try:
            assert engine.runner.model.layers[1].mlp.experts.gate_up.shape[0] == 5  # half the experts + 1 replica
            assert run_to_completion(engine, prompts_for(256), GREEDY) == ref
            engine.runner.rebalance({i: ExpertPlacement(8, 2, ((1, 3, 5, 6, 7), (0, 1, 2, 4, 6))) for i in engine.runner.placements})
            assert run_to_completion(engine, prompts_for(256), GREEDY, prefix="moved") == ref
            assert not engine.leaks()
        finally:
            engine.close()
        assert all(_gone(p) for p in pids)


def test_expert_counts_per_step(moe):
    prompts = prompts_for(256)
    single = LLMEngine.from_args(str(moe), **KW)
    with LLM(moe, expert_parallel_size=2, **KW) as llm:
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, GREEDY)
            single.add_request(f"r{i}", p, GREEDY)
        engine.step()  # one step prefills every prompt
        single.step()
        counts = engine.runner.expert_counts()
        assert len(counts) == 2  # layers 1 and 2 are MoE
        ref = [layer.mlp.experts.last_expert_counts for layer in single.runner.model.layers if hasattr(layer.mlp, "gate")]
        for c, r in zip(counts, ref):
            assert int(c.sum()) == sum(len(p) for p in prompts) * 2  # tokens x top_k
            assert c.tolist() == r.tolist()  # routing is replicated, so counts are global
        engine.step()  # one decode token per request
        assert [int(c.sum()) for c in engine.runner.expert_counts()] == [len(prompts) * 2] * 2
        totals = engine.runner.expert_counts(total=True)
        assert [int(c.sum()) for c in totals] == [(sum(map(len, prompts)) + len(prompts)) * 2] * 2
        pairs = engine.runner.rank_pairs()  # where those (token, expert) pairs were computed
        assert [sum(p) for p in pairs.values()] == [int(c.sum()) for c in totals]
        for i in range(len(prompts)):
            engine.abort(f"r{i}")


def test_rebalance_with_replicas_keeps_tokens(moe):
    """EPLB: replicas and re-placement between steps change where experts run, never the tokens."""
    ref = reference(moe, "ernie45_moe")
    prompts = prompts_for(256)
    with LLM(moe, expert_parallel_size=2, num_redundant_experts=1, **KW) as llm:
        runner = llm.engine.runner
        start = dict(runner.placements)
        assert runner.model.layers[1].mlp.experts.gate_up.shape[0] == 5  # 4 own + 1 replica
        assert run_to_completion(llm.engine, prompts, GREEDY) == ref
        window = runner.window_counts()
        assert all(sum(c) > 0 for c in window.values())
        moved = runner.rebalance()  # from the counts just observed
        assert moved != start
        for i, p in moved.items():
            assert p.slots_per_rank == 5
            hottest = max(range(8), key=lambda e: window[i][e])
            assert len(p.holders(hottest)) == 2  # the hottest expert has a replica on each rank
        assert all(sum(c) == 0 for c in runner.window_counts().values())
        assert run_to_completion(llm.engine, prompts, GREEDY, prefix="again") == ref
        # Any valid placement (here: every rank swaps to the other's block) gives the same tokens.
        swapped = {i: ExpertPlacement(8, 2, ((0, 4, 5, 6, 7), (0, 1, 2, 3, 4))) for i in start}
        runner.rebalance(swapped)
        assert runner.model.layers[2].mlp.experts.expert_ids == (0, 4, 5, 6, 7)
        assert run_to_completion(llm.engine, prompts, GREEDY, prefix="swapped") == ref
        with pytest.raises(ValueError):
            runner.rebalance({1: swapped[1]})  # must cover every MoE layer
        assert not llm.engine.leaks()
    # Rebalancing after every step, through chunked prefills and mixed steps.
    with LLM(moe, expert_parallel_size=2, num_redundant_experts=2, eplb_interval=1, ep_dispatch="alltoall",
             enable_prefix_caching=False, max_num_batched_tokens=7, block_size=4, **KW) as llm:
        assert run_to_completion(llm.engine, prompts, GREEDY) == ref
        assert llm.engine.runner.placements != {i: ExpertPlacement.contiguous(8, 2, 2) for i in start}
    with pytest.raises(ValueError, match="dispatch"):
        LLMEngine.from_args(str(moe), expert_parallel_size=2, ep_dispatch="broadcast", **KW)
    with pytest.raises(ValueError, match="expert_parallel_size > 1"):
        LLMEngine.from_args(str(moe), num_redundant_experts=1, **KW)


def test_imported_kv_reaches_every_rank(moe):
    """Disaggregated both ways: EP=1 prefill -> EP=2 decode and EP=2 prefill -> EP=1 decode give
    the single engine's tokens for a batch of sequences decoded together (an EP decode group
    must copy imported KV to every rank: each runs attention over the whole batch)."""
    prompts = prompts_for(256)
    ref = reference(moe, "ernie45_moe")
    one = LLMEngine.from_args(str(moe), **KW)
    with LLM(moe, expert_parallel_size=2, **KW) as group:
        for prefill, decode in ((one, group.engine), (group.engine, one)):
            for i, p in enumerate(prompts):
                prefill.add_request(f"p{i}", p, GREEDY, hold_kv=True)
            firsts = {}
            while prefill.has_unfinished_requests():
                for out in prefill.step():
                    if out.finished:
                        firsts[out.request_id] = out.outputs[0].token_ids[0]
            for i, p in enumerate(prompts):
                rid = f"p{i}"
                plan = decode.add_prefilled_request(rid, p, firsts[rid], GREEDY)
                n = plan.num_cached_blocks
                decode.import_kv(rid, prefill.export_kv(rid, start_block=n), start_block=n)
                prefill.release_kv(rid)
                decode.finish_kv_import(rid)
            got = {}
            while decode.has_unfinished_requests():
                for out in decode.step():
                    if out.finished:
                        got[out.request_id] = list(out.outputs[0].token_ids)
            assert [got[f"p{i}"] for i in range(len(prompts))] == ref
            assert not prefill.leaks() and not decode.leaks()


def test_killed_rank_fails_fast_and_leaves_no_process(moe):
    engine = LLMEngine.from_args(str(moe), expert_parallel_size=2, **KW)
    (pid,) = engine.runner.group.pids
    try:
        for i, p in enumerate(prompts_for(256)):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        engine.step()
        engine.step()
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EPGroupError, match="rank 1"):
            for _ in range(1000):
                engine.step()
        assert time.monotonic() - t0 < 60
        assert _gone(pid)
        with pytest.raises(EPGroupError):  # the group stays failed
            engine.step()
    finally:
        engine.close()
    assert _gone(pid)


def test_killed_rank_during_generate(moe):
    import threading

    llm = LLM(moe, expert_parallel_size=2, **KW)
    (pid,) = llm.engine.runner.group.pids
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(EPGroupError):
            llm.generate(prompts_for(256), SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    finally:
        killer.cancel()
        llm.close()
    assert time.monotonic() - t0 < 60
    assert _gone(pid)


def test_bad_sizes(moe, tiny_checkpoint):
    with pytest.raises(ValueError, match="evenly"):
        LLMEngine.from_args(str(moe), expert_parallel_size=3, **KW)
    with pytest.raises(ValueError):
        LLMEngine.from_args(str(moe), expert_parallel_size=0, **KW)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLMEngine.from_args(str(tiny_checkpoint("ernie45")), expert_parallel_size=2, **KW)
