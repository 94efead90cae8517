"""The router over real HTTP (uvicorn on a free port), driven by the official `openai` client,
with a real engine behind it (LocalBackend on the default model).

Faults that a healthy local engine cannot produce (no worker available, a worker failing mid-
stream) come from `FaultyBackend`, a stand-in that raises what ClusterBackend raises then.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from cluster.errors import NoWorkerError, WorkerError
from cluster.router.app import create_app
from cluster.router.backend import GenerationRequest
from cluster.router.media.policy import MediaSettings
from cluster.router.settings import RouterSettings
from pdserve.v1 import worker_pb2
from tests.cluster_harness import stream_then_disconnect

KEY = "sk-router-test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def serve(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-router", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "router did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


class FaultyBackend:
    """Stands in for a cluster without ready workers ("no_worker") or whose worker dies mid-stream."""

    def __init__(self, model) -> None:
        self.model = model
        self.mode = "no_worker"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        if self.mode == "no_worker":
            raise NoWorkerError("no ready prefill worker")
        yield worker_pb2.TokenChunk(token_ids=[42], text="Hi", num_prompt_tokens=len(request.prompt_token_ids))
        raise WorkerError("decode worker d-1 failed: connection reset")

    async def readiness(self) -> tuple[bool, str]:
        return False, "no ready decode worker"

    async def worker_stats(self) -> list[worker_pb2.StatsResponse]:
        return []

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def backend():
    from cluster.router.local import LocalBackend

    b = LocalBackend.from_args(None, num_kv_blocks=256, max_model_len=1024)
    yield b
    asyncio.run(b.close())


@pytest.fixture(scope="module")
def urls(backend):
    """main: keys + think parser; plain: no keys; limited: 2 requests/minute; faulty: FaultyBackend."""
    faulty = FaultyBackend(backend.model)
    apps = {
        "main": create_app(backend, RouterSettings(api_keys=[KEY], reasoning_parser="think"), close_backend=False),
        "plain": create_app(backend, RouterSettings(), close_backend=False),
        "limited": create_app(backend, RouterSettings(api_keys=[KEY], rate_limit_per_minute=2), close_backend=False),
        "faulty": create_app(faulty, RouterSettings()),
    }
    with serve(apps["main"]) as main, serve(apps["plain"]) as plain, serve(apps["limited"]) as limited, \
            serve(apps["faulty"]) as bad:
        yield {"main": main, "plain": plain, "limited": limited, "faulty": bad, "faulty_backend": faulty}


@pytest.fixture(scope="module")
def client(urls):
    return openai.OpenAI(base_url=f"{urls['main']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(backend):
    return backend.model.name


def leaks(backend) -> list[str]:
    return asyncio.run(backend.loop.call(lambda e: e.leaks()))


def wait_no_leaks(backend, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (problems := leaks(backend)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return problems


# ----- happy paths -----
def test_health_ready_and_models(urls, model):
    assert httpx.get(f"{urls['main']}/health").status_code == 200
    ready = httpx.get(f"{urls['main']}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    ids = [m.id for m in openai.OpenAI(base_url=f"{urls['main']}/v1", api_key=KEY).models.list().data]
    assert ids == [model]


def test_greedy_chat_answers_paris_with_tokenizer_usage(client, urls, model, backend):
    tok = backend.model.tokenizer
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == model
    choice = resp.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # The think parser found no reasoning in a plain answer: content intact, reasoning_content null.
    assert getattr(choice.message, "reasoning_content", None) is None
    plain = openai.OpenAI(base_url=f"{urls['plain']}/v1", api_key="unused", max_retries=0)  # no parser there
    same = plain.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    assert choice.message.content == same.choices[0].message.content


def test_streamed_chat_equals_full_and_reports_usage(client, model):
    full = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_full_and_streamed_with_usage(client, model, backend):
    prompt = "The capital of France is"
    full = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=6)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.usage.prompt_tokens == len(backend.model.tokenizer(prompt).input_ids)
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    stream = list(client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    assert stream[-1].usage.completion_tokens == 6


def test_batch_prompts_and_token_prompts(client, model, backend):
    ids = backend.model.tokenizer("1, 2, 3,").input_ids
    resp = client.completions.create(model=model, prompt=["1, 2, 3,", "The sky is"], temperature=0, max_tokens=3, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.completion_tokens == 12  # summed over every choice
    by_ids = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=3)
    assert by_ids.choices[0].text == resp.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_echo_content_parts_and_vllm_extras(client, model):
    resp = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=3, echo=True)
    assert resp.choices[0].text.startswith("The sky is") and len(resp.choices[0].text) > len("The sky is")
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    resp = client.chat.completions.create(model=model, messages=parts, temperature=0, max_tokens=4,
                                          extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0,
                                                      "ignore_eos": True, "min_tokens": 4, "skip_special_tokens": True,
                                                      "stop_token_ids": [], "some_future_field": {"x": 1}})
    assert resp.usage.completion_tokens == 4


def test_n2_seeded_sampling_differs_and_reproduces(client, model):
    def run():
        r = client.completions.create(model=model, prompt="Once upon a time", temperature=1.0, max_tokens=8, n=2,
                                      seed=1234)
        return [c.text for c in r.choices]

    first = run()
    assert len(first) == 2 and first[0] != first[1]
    assert run() == first


def test_n2_streaming_interleaves_both_choices(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=4, n=2,
                                                 stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"


def test_chat_logprobs_shape(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True,
                                          top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token  # greedy: the sampled token is the best one


def test_completion_logprobs_shape(client, model):
    resp = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)


def test_stop_string(client, model):
    resp = client.completions.create(model=model, prompt="1, 2, 3,", temperature=0, max_tokens=10, stop=["5"])
    choice = resp.choices[0]
    assert choice.text == " 4, " and choice.finish_reason == "stop"
    assert choice.model_extra.get("stop_reason") == "5"


def test_multi_token_stop_string_never_leaks_streamed_or_not(client, model):
    kw = dict(model=model, prompt="1, 2, 3,", temperature=0, max_tokens=10, stop=[" 5"])
    assert client.completions.create(**kw).choices[0].text == " 4,"
    # Streaming holds back text that may start the stop string, so no delta ever shows " 5".
    deltas = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(deltas) == " 4,"


def test_tokenize_and_detokenize(urls, model, backend):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{urls['main']}/tokenize", json={"model": model, "prompt": "Hello world"}, headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == backend.model.tokenizer("Hello world").input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    chat = httpx.post(f"{urls['main']}/tokenize", json={"model": model, "messages": QUESTION}, headers=headers).json()
    assert chat["count"] > body["count"]
    r = httpx.post(f"{urls['main']}/detokenize", json={"model": model, "tokens": body["tokens"]}, headers=headers)
    assert r.json() == {"prompt": "Hello world"}


def test_metrics_count_requests(urls, client, model):
    client.completions.create(model=model, prompt="Hi", temperature=0, max_tokens=2)
    text = httpx.get(f"{urls['main']}/metrics").text  # open: no key
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["pdserve:time_to_first_token_seconds_count"] >= 1
    assert values["pdserve:e2e_request_latency_seconds_count"] >= 1
    assert values["pdserve:request_queue_time_seconds_count"] >= 1
    assert values["pdserve:inter_token_latency_seconds_count"] >= 1
    assert values["pdserve:prompt_tokens_total"] > 0 and values["pdserve:generation_tokens_total"] >= 2
    assert values['pdserve:request_success_total{finished_reason="length"}'] >= 1
    assert values['pdserve:worker_role{role="mixed",worker="local"}'] == 1.0
    assert 'pdserve:num_requests_running{role="mixed",worker="local"}' in values
    assert 'pdserve:kv_cache_usage_perc{role="mixed",worker="local"}' in values
    assert 'pdserve:prefix_cache_queries_total{role="mixed",worker="local"}' in values
    assert 'pdserve:kv_transfer_bytes_total{role="mixed",worker="local"}' in values


# ----- errors -----
def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_400_invalid_json_body_and_fields(urls, model):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{urls['main']}/v1/chat/completions", content=b"{oops", headers=h)
    assert "JSON" in _error(bad_json, 400)["message"]
    err = _error(httpx.post(f"{urls['main']}/v1/chat/completions", json={"model": model}, headers=h), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    err = _error(httpx.post(f"{urls['main']}/v1/completions", json={"model": model, "prompt": "x", "n": "many"},
                            headers=h), 400)
    assert err["param"] == "n"


def test_400_invalid_sampling_value(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", top_p=0)


def test_400_context_length(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello world", max_tokens=1023)
    assert "maximum context length is 1024 tokens" in info.value.message
    assert "1025 tokens (2 in the messages, 1023 in the completion)" in info.value.message
    with pytest.raises(openai.BadRequestError, match="resulted in"):
        client.completions.create(model=model, prompt=[1] * 1024, max_tokens=None)


def test_401_missing_or_wrong_key(urls, model):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = _error(httpx.post(f"{urls['main']}/v1/completions", json={"model": model, "prompt": "x"},
                                headers=headers), 401)
        assert err["code"] == "invalid_api_key" and KEY not in err["message"]
    _error(httpx.get(f"{urls['main']}/v1/models"), 401)
    _error(httpx.post(f"{urls['main']}/tokenize", json={"prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{urls['main']}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{urls['main']}/metrics").status_code == 200


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    assert info.value.body["code"] == "model_not_found" and "gpt-17" in info.value.message


def test_413_body_too_large(urls, model):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "m", "prompt": "' + b"a" * (4 << 20) + b'"}'
    assert _error(httpx.post(f"{urls['main']}/v1/completions", content=big, headers=h), 413)["code"] == \
        "request_too_large"

    def chunked():  # no Content-Length: caught by counting the bytes read
        yield big[:1000]
        yield big[1000:]

    _error(httpx.post(f"{urls['main']}/v1/completions", content=chunked(), headers=h), 413)


def test_429_rate_limit_with_retry_after(urls, model):
    c = openai.OpenAI(base_url=f"{urls['limited']}/v1", api_key=KEY, max_retries=0)
    c.models.list()
    c.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        c.models.list()
    assert 1 <= int(info.value.response.headers["Retry-After"]) <= 60
    assert info.value.body["code"] == "rate_limit_exceeded"
    assert httpx.get(f"{urls['limited']}/health").status_code == 200  # open paths are not limited


def test_503_no_worker_and_not_ready(urls, model):
    urls["faulty_backend"].mode = "no_worker"
    c = openai.OpenAI(base_url=f"{urls['faulty']}/v1", api_key="unused", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            r = c.chat.completions.create(model=model, messages=QUESTION, stream=stream)
            list(r) if stream else None
        assert info.value.status_code == 503 and info.value.body["code"] == "no_worker_available"
    err = _error(httpx.get(f"{urls['faulty']}/ready"), 503)
    assert err["message"] == "no ready decode worker"
    assert httpx.get(f"{urls['faulty']}/health").status_code == 200


def test_error_mid_stream_is_a_final_event(urls, model):
    urls["faulty_backend"].mode = "mid_stream"
    with httpx.stream("POST", f"{urls['faulty']}/v1/completions", json={"model": model, "prompt": "x",
                                                                         "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert '"text":"Hi"' in events[0]
    assert events[-2].startswith('data: {"error": ') and "connection reset" in events[-2]
    assert events[-1] == "data: [DONE]"
    c = openai.OpenAI(base_url=f"{urls['faulty']}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="connection reset"):
        list(c.completions.create(model=model, prompt="x", stream=True))


# ----- disconnects -----
def test_disconnect_mid_stream_frees_the_engine(urls, model, backend):
    body = {"model": model, "prompt": "Write a long story about a dragon.", "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    stream_then_disconnect(urls['main'], body, KEY)
    # 900 tokens take about a minute here: no leak within seconds means the request was aborted.
    assert wait_no_leaks(backend, 10.0) == []


def test_disconnect_while_waiting_for_a_full_response_frees_the_engine(urls, model, backend):
    body = {"model": model, "prompt": "Write a long story about a dragon.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{urls['main']}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=1.5)
    assert wait_no_leaks(backend, 10.0) == []


def test_a_text_model_refuses_image_parts_and_enable_mm(urls, backend):
    import base64

    png = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()
    resp = httpx.post(f"{urls['plain']}/v1/chat/completions", timeout=30, json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "multimodal_disabled"
    with pytest.raises(ValueError, match="not a vision model"):
        create_app(backend, RouterSettings(media=MediaSettings(enable_mm=True)))
