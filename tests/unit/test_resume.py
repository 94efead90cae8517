"""Resuming a request from the tokens it already generated (`add_request(..., resume=...)`): the
continuation equals what the first engine went on to produce, for greedy and seeded sampling,
with penalties and logprobs, and the streamed text joins without a gap or a repeat."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine import LLMEngine, SamplingParams

PROMPT = list(range(3, 40))


def stream(engine: LLMEngine, rid: str, prompt, params: SamplingParams, resume=()) -> tuple[list[int], str, list, str]:
    """(new token ids, streamed text, new tokens' logprobs, finish reason), step by step."""
    engine.add_request(rid, prompt, params, resume=resume)
    tokens: list[int] = []
    text = ""
    logprobs: list = []
    reason = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens += c.new_token_ids
            text += c.new_text
            if c.logprobs is not None and c.new_token_ids:
                logprobs += c.logprobs[len(c.logprobs) - len(c.new_token_ids):]
            reason = c.finish_reason or reason
    return tokens, text, logprobs, reason


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=14, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=14, ignore_eos=True, repetition_penalty=1.3,
                   frequency_penalty=0.5, presence_penalty=0.2, min_tokens=10),
], ids=["greedy", "seeded-logprobs", "seeded-penalties"])
@pytest.mark.parametrize("k", [1, 6])
def test_resumed_request_continues_exactly(tiny_checkpoint, make_engine, params, k):
    path = tiny_checkpoint("llama")
    full, _, full_lp, reason = stream(make_engine(path), "a", PROMPT, params)
    assert len(full) == 14
    rest, _, rest_lp, reason2 = stream(make_engine(path), "b", PROMPT, params, resume=full[:k])
    assert rest == full[k:] and reason2 == reason == "length"
    if params.logprobs is not None:
        assert len(rest_lp) == len(rest)
        for a, b in zip(full_lp[k:], rest_lp):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_seeded_sampling_differs_by_seed_and_repeats_by_seed(tiny_checkpoint, make_engine):
    eng = make_engine(tiny_checkpoint("llama"))
    p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = stream(eng, "a", PROMPT, replace(p, seed=1))[0]
    b = stream(eng, "b", PROMPT, replace(p, seed=1))[0]
    c = stream(eng, "c", PROMPT, replace(p, seed=2))[0]
    assert a == b and a != c


def test_resumed_text_joins_the_streamed_text_with_stop_strings():
    """The real default model (it has a tokenizer): text streamed before the resume point plus the
    resumed stream's text is the uninterrupted stream's text, with a stop string held back."""
    eng = LLMEngine.from_args(None, dtype="float32", num_kv_blocks=128, max_model_len=512)
    prompt = eng.tokenize("The capital of France is Paris. The capital of Italy is")
    params = SamplingParams(temperature=0.0, max_tokens=30, stop=["capital of Spain"], ignore_eos=True)
    eng.add_request("full", prompt, params)
    per_token: list[tuple[int, str]] = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            c = out.outputs[0]
            assert len(c.new_token_ids) == 1  # one token per step: its text is that token's
            per_token.append((c.new_token_ids[0], c.new_text))
    full_tokens = [t for t, _ in per_token]
    full_text = "".join(s for _, s in per_token)
    assert len(full_tokens) >= 5 and "Spain" not in full_text  # it ended at the stop string
    for k in (1, len(full_tokens) - 2):
        head_text = "".join(s for _, s in per_token[:k])
        tokens, text, _, _ = stream(eng, f"resume{k}", prompt, params, resume=full_tokens[:k])
        assert full_tokens[:k] + tokens == full_tokens
        assert head_text + text == full_text
    assert not eng.leaks()


def test_bad_resumes_are_refused(tiny_checkpoint, make_engine):
    eng = make_engine(tiny_checkpoint("llama"), max_model_len=64)
    p = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        eng.add_request("a", PROMPT, p, resume=[5] * 5)
    with pytest.raises(ValueError, match="n must be 1"):
        eng.add_request("b", PROMPT, SamplingParams(temperature=1.0, n=2, max_tokens=5), resume=[5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("c", PROMPT, p, resume=[10**7])
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("d", PROMPT, SamplingParams(max_tokens=40), resume=[5] * 27)
    assert not eng.has_unfinished_requests()
