"""Sampling behaviour on a tiny random model: seeds, n, top-k/top-p/min-p, penalties, logprobs, stops."""
from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from engine.layers import sampler
from engine.request import Request
from tests.conftest import run_to_completion

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


@pytest.fixture
def engine(tiny_checkpoint, make_engine):
    return make_engine(tiny_checkpoint("llama"))


def test_same_seed_same_tokens_different_seed_differs(engine):
    def run(seed, prefix):
        return run_to_completion(engine, PROMPTS, SamplingParams(temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True), prefix)

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(engine):
    greedy = run_to_completion(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), "g")
    topk1 = run_to_completion(engine, PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=10, seed=3, ignore_eos=True), "k")
    assert topk1 == greedy


def test_n_returns_n_distinct_completions(engine):
    engine.add_request("n", PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=1, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                done[c.index] = c
    assert sorted(done) == [0, 1, 2]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in done.values())
    assert len({c.token_ids for c in done.values()}) > 1


def test_max_tokens_and_stop_token_ids(engine):
    (free,) = run_to_completion(engine, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), "f")
    stop_tok = free[5]
    first = free.index(stop_tok)
    engine.add_request("s", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_tok]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop_tok
    assert list(final.token_ids) == free[: first + 1]


def test_min_tokens_suppresses_stop_tokens(engine):
    (free,) = run_to_completion(engine, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), "f")
    stop_tok = free[0]
    (out,) = run_to_completion(engine, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4, stop_token_ids=[stop_tok]), "m")
    assert len(out) >= 4
    assert stop_tok not in out[:4]


def test_logprobs_are_normalised_and_include_sampled_token(engine):
    engine.add_request("l", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out.outputs[0]
    assert final is not None and final.logprobs is not None and len(final.logprobs) == 5
    for tok, lp in zip(final.token_ids, final.logprobs):
        assert tok in lp and 3 <= len(lp) <= 4
        assert all(v <= 0 for v in lp.values())
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token


def _req(tokens, **kw):
    return Request("r", tokens, SamplingParams(**kw), eos_token_ids=(0,))


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    r = _req([0, 1], repetition_penalty=2.0, temperature=0.0)
    r.append_token(3)
    got = sampler._apply_penalties(logits[0].clone(), r)
    assert got.tolist() == [1.0, -2.0, 0.5, 1.5]
    r = _req([2], presence_penalty=0.5, frequency_penalty=0.25, temperature=0.0)
    for t in (3, 3, 1):
        r.append_token(t)
    got = sampler._apply_penalties(logits[0].clone(), r)
    assert got.tolist() == pytest.approx([2.0, -1.75, 0.5, 2.0])


def test_top_p_and_min_p_filter_the_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = sampler._filter(logits.clone(), _req([1], temperature=1.0, top_p=0.7))
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = sampler._filter(logits.clone(), _req([1], temperature=1.0, min_p=0.5))
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = sampler._filter(logits.clone(), _req([1], temperature=1.0, top_k=3))
    assert torch.isfinite(kept).tolist() == [True, True, True, False]


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([math.log(0.7), math.log(0.2), math.log(0.1)])
    r = _req([1], temperature=1.0, seed=0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler.sample(logits[None].clone(), [r])[0].token_id] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_tokens=0), dict(top_k=-2), dict(min_p=2.0),
     dict(n=0), dict(logprobs=21), dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(min_tokens=5, max_tokens=2),
     dict(stop=[""])],
)
def test_invalid_sampling_params_raise_value_error_naming_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
