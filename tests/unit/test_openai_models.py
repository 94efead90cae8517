"""Request models at the HTTP boundary: what they accept, what they reject, and how they map to
engine SamplingParams; plus the router's small pure helpers (settings, rate limiters, prompts)."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from cluster.errors import InvalidRequestError, RequestTooLargeError
from cluster.router.app import validation_message
from cluster.router.limits import FixedWindowRateLimiter, RedisRateLimiter
from cluster.router.openai import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, error_body
from cluster.router.serving import Prompt, completion_prompts, fan_out, max_tokens_for, sampling_params
from cluster.router.settings import RouterSettings

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


def comp(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


# ----- accepted shapes -----
@pytest.mark.parametrize("prompt,kind", [
    ("text", str), (["a", "b"], list), ([1, 2, 3], list), ([[1, 2], [3]], list),
])
def test_completion_prompt_shapes(prompt, kind):
    assert isinstance(comp(prompt=prompt).prompt, kind)


def test_unknown_fields_are_ignored_and_defaults_match_vllm():
    req = chat(some_future_field={"x": 1}, user="u")
    assert req.n == 1 and not req.stream and req.requested_max_tokens is None
    assert comp().max_tokens == 16  # OpenAI's completions default
    assert comp(max_tokens=None).max_tokens is None  # explicit null: fill the context


def test_chat_content_parts_join_text():
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "a\nb"
    bad = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="image_url"):
        bad.messages[0].text()


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=7).requested_max_tokens == 7
    assert chat(max_tokens=5).requested_max_tokens == 5


def test_chat_logprobs_mapping():
    assert chat().num_logprobs is None
    assert chat(logprobs=True).num_logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).num_logprobs == 3


def test_sampling_params_mapping_with_vllm_extras():
    req = comp(temperature=0.5, top_p=0.9, stop="x", seed=3, presence_penalty=0.5, frequency_penalty=-0.5,
               top_k=20, min_p=0.1, repetition_penalty=1.1, ignore_eos=True, min_tokens=2,
               skip_special_tokens=False, include_stop_str_in_output=True, stop_token_ids=[7], logprobs=2)
    p = sampling_params(req, 10, req.logprobs)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens) == (1, 0.5, 0.9, 20, 0.1, 3, 10)
    assert p.stop == ("x",) and p.stop_token_ids == (7,) and p.ignore_eos and p.min_tokens == 2
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.1, 0.5, -0.5)
    assert not p.skip_special_tokens and p.include_stop_str_in_output and p.logprobs == 2
    defaults = sampling_params(comp(temperature=None, presence_penalty=None), 4, None)
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.presence_penalty) == (1.0, 1.0, 0, 0.0)


# ----- rejected -----
@pytest.mark.parametrize("make,fields,match", [
    (chat, {"messages": []}, "at least one message"),
    (chat, {"n": 0}, "between 1 and 128"),
    (chat, {"n": 129}, "between 1 and 128"),
    (chat, {"top_logprobs": 2}, "logprobs must be set to true"),
    (chat, {"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
    (chat, {"stream_options": {"include_usage": True}}, "stream=true"),
    (chat, {"logit_bias": {"1": 2.0}}, "not supported"),
    (chat, {"response_format": {"type": "json_object"}}, "not supported"),
    (chat, {"messages": "hi"}, "valid list"),
    (comp, {"prompt": []}, "must not be empty"),
    (comp, {"prompt": [[]]}, "must not be empty"),
    (comp, {"prompt": [1, "a"]}, "prompt"),
    (comp, {"suffix": "x"}, "not supported"),
    (comp, {"echo": True, "logprobs": 1}, "echo"),
    (comp, {"temperature": "hot"}, "valid number"),
])
def test_invalid_bodies_fail_validation(make, fields, match):
    with pytest.raises(ValidationError, match=match):
        make(**fields)


@pytest.mark.parametrize("fields,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"), ({"min_tokens": 20}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
])
def test_invalid_sampling_values_become_400_with_param(fields, param):
    req = comp(**fields)
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(req, 10, req.logprobs)
    assert info.value.status == 400 and info.value.param == param


def test_validation_message_names_the_field():
    with pytest.raises(ValidationError) as info:
        chat(n=0)
    message, param = validation_message(info.value.errors())
    assert param == "n" and message.startswith("n: ")
    with pytest.raises(ValidationError) as info:
        DetokenizeRequest.model_validate({"tokens": ["x"]})
    assert validation_message(info.value.errors())[1] == "tokens.0"


def test_error_body_shape():
    body = error_body(RequestTooLargeError("too big"))
    assert body == {"error": {"message": "too big", "type": "invalid_request_error", "param": None,
                              "code": "request_too_large"}}


# ----- context length -----
def test_max_tokens_default_fills_the_context():
    assert max_tokens_for(10, None, 100) == 90
    assert max_tokens_for(10, 90, 100) == 90


def test_context_length_errors_say_the_numbers():
    with pytest.raises(InvalidRequestError, match=r"maximum context length is 100 tokens. However, you requested "
                                                  r"101 tokens \(10 in the messages, 91 in the completion\)"):
        max_tokens_for(10, 91, 100)
    with pytest.raises(InvalidRequestError, match="resulted in 100 tokens"):
        max_tokens_for(100, None, 100)


# ----- prompts and fan-out -----
class _Tok:
    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_completion_prompts_normalise_every_shape():
    tok = _Tok()
    assert completion_prompts(tok, "ab") == [Prompt((97, 98), "ab")]
    assert completion_prompts(tok, ["a", "b"]) == [Prompt((97,), "a"), Prompt((98,), "b")]
    assert completion_prompts(tok, [5, 6]) == [Prompt((5, 6), None)]
    assert completion_prompts(tok, [[5], [6, 7]]) == [Prompt((5,), None), Prompt((6, 7), None)]
    with pytest.raises(InvalidRequestError, match="empty"):
        completion_prompts(tok, "")


def test_fan_out_indexes_ids_and_seeds():
    req = comp(n=2, seed=10)
    prompts = [Prompt((1,), "a"), Prompt((2,), "b")]
    seqs = fan_out("cmpl-x", prompts, [sampling_params(req, 4, None)] * 2, 2)
    assert [s.index for s in seqs] == [0, 1, 2, 3]
    assert [s.request.request_id for s in seqs] == ["cmpl-x-0", "cmpl-x-1", "cmpl-x-2", "cmpl-x-3"]
    assert [s.request.params.seed for s in seqs] == [10, 11, 10, 11]
    assert [s.request.prompt_token_ids for s in seqs] == [(1,), (1,), (2,), (2,)]
    unseeded = fan_out("c", prompts[:1], [sampling_params(comp(n=2), 4, None)], 2)
    assert [s.request.params.seed for s in unseeded] == [None, None]


# ----- settings -----
def test_settings_keys_from_flag_or_env_and_never_in_repr():
    env = {"PDSERVE_API_KEY": "k1, k2,,"}
    assert RouterSettings.with_env_keys(None, env).api_keys == ["k1", "k2"]
    assert RouterSettings.with_env_keys(["flag"], env).api_keys == ["flag"]
    assert RouterSettings.with_env_keys(None, {}).api_keys == []
    s = RouterSettings(api_keys=["sk-secret"], rate_limit_per_minute=5)
    assert "sk-secret" not in repr(s) and "sk-secret" not in str(s)
    assert s.max_body_bytes == 4 << 20


def test_settings_reject_bad_values():
    with pytest.raises(ValidationError, match="known parsers"):
        RouterSettings(reasoning_parser="nope")
    with pytest.raises(ValidationError):
        RouterSettings(rate_limit_per_minute=0)
    with pytest.raises(ValidationError):
        RouterSettings(api_keys=[""])


# ----- rate limiters -----
def test_fixed_window_limiter():
    now = [120.0]
    limiter = FixedWindowRateLimiter(2, clock=lambda: now[0])

    async def run():
        a = [await limiter.allow("k") for _ in range(3)]
        other = await limiter.allow("other")
        now[0] = 150.0
        still = await limiter.allow("k")
        now[0] = 180.0
        fresh = await limiter.allow("k")
        return a, other, still, fresh

    a, other, still, fresh = asyncio.run(run())
    assert a[:2] == [(True, 0.0), (True, 0.0)] and a[2] == (False, 60.0)
    assert other == (True, 0.0) and still == (False, 30.0) and fresh == (True, 0.0)


def test_redis_limiter_delegates_to_the_store():
    class Store:
        calls = []

        async def rate_limit(self, key, limit):
            self.calls.append((key, limit))
            return False, 12.5

    store = Store()
    assert asyncio.run(RedisRateLimiter(store, 7).allow("k")) == (False, 12.5)
    assert store.calls == [("k", 7)]
    with pytest.raises(ValueError):
        RedisRateLimiter(store, 0)


@pytest.mark.parametrize("fields,param", [
    ({"stream": "maybe"}, "stream"), ({"stop": 5}, "stop"), ({"prompt": [1, "a"]}, "prompt"),
    ({"stream_options": {"include_usage": "x"}, "stream": True}, "stream_options.include_usage"),
])
def test_validation_param_survives_union_tags(fields, param):
    with pytest.raises(ValidationError) as info:
        comp(**fields)
    assert validation_message(info.value.errors())[1] == param
