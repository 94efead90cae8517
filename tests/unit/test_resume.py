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


def _step_until(engine: LLMEngine, rid: str, k: int) -> list[int]:
    """Step until `rid` has generated k tokens; returns them."""
    while True:
        engine.step()
        req = engine.requests[rid]
        if req.num_output_tokens >= k:
            assert req.num_output_tokens == k
            return list(req.output_token_ids)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=14, ignore_eos=True, repetition_penalty=1.3,
                   frequency_penalty=0.5, presence_penalty=0.2, min_tokens=10, logprobs=2),
], ids=["greedy", "seeded-penalties"])
@pytest.mark.parametrize("k", [1, 5])
def test_running_request_moved_with_its_kv_continues_exactly(tiny_checkpoint, make_engine, params, k):
    """Live migration at the engine seam: the source pins the running request's KV (prompt +
    generated - 1 tokens), the target takes the blocks and the tokens and samples exactly what the
    source would have; the source's blocks are free after release."""
    path = tiny_checkpoint("llama")
    full, _, full_lp, _ = stream(make_engine(path), "ref", PROMPT, params)
    src, dst = make_engine(path), make_engine(path)
    src.add_request("m", PROMPT, params)
    other = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    src.add_request("bystander", PROMPT[:9], other)  # in the same batch; it must not notice
    head = _step_until(src, "m", k)
    assert head == full[:k]
    num_kv = src.hold_running_kv("m")
    assert num_kv == len(PROMPT) + k - 1 and src.stats().num_holding_kv == 1
    data = src.export_kv("m")
    imp = dst.add_migrated_request("m", PROMPT, head, params)
    dst.import_kv("m", data[:, imp.num_cached_blocks:], start_block=imp.num_cached_blocks)
    dst.finish_migrated_import("m")
    src.release_kv("m")
    while src.has_unfinished_requests():
        src.step()
    rest, rest_lp = [], []
    while dst.has_unfinished_requests():
        for out in dst.step():
            c = out.outputs[0]
            rest += c.new_token_ids
            if c.logprobs is not None and c.new_token_ids:
                rest_lp += c.logprobs[len(c.logprobs) - len(c.new_token_ids):]
    assert head + rest == full
    if params.logprobs is not None:
        for a, b in zip(full_lp[k:], rest_lp):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_only_a_request_between_decode_steps_can_be_held_for_moving(tiny_checkpoint, make_engine):
    eng = make_engine(tiny_checkpoint("llama"))
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request("w", PROMPT, p)
    with pytest.raises(ValueError, match="between decode steps"):
        eng.hold_running_kv("w")  # waiting: no KV yet
    with pytest.raises(ValueError, match="between decode steps"):
        eng.hold_running_kv("nope")
    with pytest.raises(ValueError, match="generated tokens"):
        eng.add_migrated_request("x", PROMPT, [], p)
    with pytest.raises(ValueError, match="not a migrated request"):
        eng.finish_migrated_import("w")
    imp = eng.add_migrated_request("y", PROMPT, [5, 6], p)
    assert len(imp.block_ids) == -(-(len(PROMPT) + 1) // 16)
    eng.abort("y")  # an import given up frees its blocks
    while eng.has_unfinished_requests():
        eng.step()
