"""The served cluster end to end: Ray actors as workers, real Redis, real NIXL and gRPC KV
transfers, the router over real HTTP driven by the official `openai` client.

Three clusters share one Ray session: 1P+1D over NIXL, 1P+1D over gRPC, and one mixed worker.
They run the default model in float32 so that greedy outputs are identical whatever the batch
(bf16 kernels differ by row count) and can be compared token for token.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest

from tests.cluster_harness import (TEST_ENGINE, cluster_config, ray_session, running_cluster, stream_then_disconnect,
                                   worker_leaks, worker_stats)

pytestmark = pytest.mark.slow

ENGINE = TEST_ENGINE.model_copy(update={"dtype": "float32"})
KEY = "sk-test-key"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def clusters(redis_server):
    url = redis_server.url
    with ray_session():
        with running_cluster(cluster_config("nixl", engine=ENGINE, kv_transport="nixl", kv_lease_seconds=4.0,
                                            api_keys=(KEY,)), url) as nixl, \
             running_cluster(cluster_config("grpc", engine=ENGINE, kv_transport="grpc",
                                            kv_failure_policy="recompute"), url) as grpc_, \
             running_cluster(cluster_config("mixed", engine=ENGINE, mixed=1, prefill=0, decode=0), url) as mixed:
            yield {"nixl": nixl, "grpc": grpc_, "mixed": mixed}


def _client(session) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(session, question: str, **kw):
    return _client(session).chat.completions.create(
        model=_client(session).models.list().data[0].id, messages=[{"role": "user", "content": question}],
        temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 24), **kw)


@pytest.fixture(scope="module")
def offline_answers():
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM(dtype="float32", num_kv_blocks=256)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], SamplingParams(temperature=0, max_tokens=24))
    return [o.outputs[0].text for o in outs]


def test_greedy_chat_is_identical_across_nixl_grpc_mixed_and_offline(clusters, offline_answers):
    assert "Paris" in offline_answers[0]
    for name, session in clusters.items():
        answers = [_chat(session, q).choices[0].message.content for q in QUESTIONS]
        assert answers == offline_answers, name


def test_streamed_equals_non_streamed_and_usage_matches_the_tokenizer(clusters):
    from engine.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    for name, session in clusters.items():
        client = _client(session)
        model = client.models.list().data[0].id
        full = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=5)
        assert full.usage.prompt_tokens == len(prompt_ids), name
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 5, name
        stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=5,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content, name
        assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == len(prompt_ids)
        comp = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=6)
        assert comp.usage.prompt_tokens == len(tok("The capital of France is").input_ids), name
        assert comp.usage.completion_tokens == 6
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="The capital of France is", temperature=0, max_tokens=6, stream=True))
        assert streamed == comp.choices[0].text, name


def test_kv_really_moves_and_metrics_show_it(clusters):
    def roles(session):
        stats = worker_stats(session)
        (decode,) = [s for k, s in stats.items() if k.startswith("decode")]
        (prefill,) = [s for k, s in stats.items() if k.startswith("prefill")]
        return decode, prefill

    def metric_bytes(session):
        metrics = httpx.get(f"{session.url}/metrics", timeout=30).text
        lines = [ln for ln in metrics.splitlines() if ln.startswith("pdserve:kv_transfer_bytes") and "decode" in ln]
        assert "pdserve:time_to_first_token_seconds" in metrics
        return max((float(ln.rsplit(" ", 1)[1]) for ln in lines), default=0.0)

    # Differences across this one request: the module-scoped clusters carry earlier tests' traffic.
    for name in ("nixl", "grpc"):
        session = clusters[name]
        d0, p0 = roles(session)
        bytes0 = metric_bytes(session)
        _chat(session, "Tell me a short fact about the sea.", max_tokens=4)
        d1, p1 = roles(session)
        assert d1.kv_transfers_total - d0.kv_transfers_total == 1, name
        assert d1.kv_transfer_bytes_total > d0.kv_transfer_bytes_total, name
        assert d1.kv_recompute_total == d0.kv_recompute_total and d1.kv_transfer_failures_total == d0.kv_transfer_failures_total, name
        if name == "grpc":
            assert p1.kv_blocks_served_total > p0.kv_blocks_served_total
        assert metric_bytes(session) - bytes0 == d1.kv_transfer_bytes_total - d0.kv_transfer_bytes_total, name


def test_32_concurrent_streams_complete_with_correct_outputs(clusters):
    session = clusters["nixl"]
    prompts = [f"Count from {i} to {i + 5}." for i in range(32)]

    async def one(client, model, prompt):
        stream = await client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
        model = (await client.models.list()).data[0].id
        concurrent = await asyncio.gather(*(one(client, model, p) for p in prompts))
        # Sequential reference on the mixed cluster (float32: batching does not change greedy tokens).
        mixed = openai.AsyncOpenAI(base_url=f"{clusters['mixed'].url}/v1", api_key=KEY, max_retries=0, timeout=300)
        sequential = [await one(mixed, model, p) for p in prompts[:8]]
        return concurrent, sequential

    concurrent, sequential = asyncio.run(main())
    assert all(concurrent) and len(concurrent) == 32
    assert concurrent[:8] == sequential
    assert worker_leaks(session) == []


def test_client_disconnect_mid_stream_frees_blocks_on_both_workers(clusters):
    session = clusters["nixl"]
    body = {"model": _client(session).models.list().data[0].id, "prompt": "Write a long story about a dragon.",
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    stream_then_disconnect(session.url, body, KEY)
    assert worker_leaks(session) == []
    assert all(s.num_requests_running == 0 for s in worker_stats(session).values())


def test_lease_expires_when_no_decode_worker_pulls(clusters):
    """A prefill whose decode side never comes (router or decode worker died): the lease frees the blocks."""
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    session = clusters["nixl"]
    (p,) = [w for w in session.workers if w["role"] == "prefill"]
    before = worker_stats(session)
    (p_before,) = [s for k, s in before.items() if k.startswith("prefill")]

    async def prefill_only():
        async with grpc.aio.insecure_channel(p["address"]) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            req = worker_pb2.GenerateRequest(request_id="orphan", prompt_token_ids=list(range(100, 140)),
                                             params=worker_pb2.SamplingParams(max_tokens=8, temperature=0))
            return await stub.Prefill(req, timeout=60)

    resp = asyncio.run(prefill_only())
    assert resp.HasField("handle") and len(resp.handle.block_ids) == 3
    (p_now,) = [s for k, s in worker_stats(session).items() if k.startswith("prefill")]
    assert p_now.num_active_leases == 1 and p_now.num_holding_kv == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        (p_now,) = [s for k, s in worker_stats(session).items() if k.startswith("prefill")]
        if p_now.num_active_leases == 0:
            break
        time.sleep(0.3)
    assert p_now.kv_lease_expired_total == p_before.kv_lease_expired_total + 1
    assert worker_leaks(session) == []


def _decode_with_bogus_handle(session):
    """Ask the decode worker to pull KV that no prefill worker holds (a lease that is gone)."""
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    (p,) = [w for w in session.workers if w["role"] == "prefill"]
    (d,) = [w for w in session.workers if w["role"] == "decode"]
    prompt = list(range(200, 240))

    async def run():
        async with grpc.aio.insecure_channel(d["address"]) as ch, grpc.aio.insecure_channel(p["address"]) as pch:
            health = await worker_pb2_grpc.WorkerStub(pch).Health(worker_pb2.HealthRequest(), timeout=10)
            assert health.ready
            # The real handle of a prefill, then released, so the pull finds no lease.
            gen = worker_pb2.GenerateRequest(request_id="gone", prompt_token_ids=prompt,
                                             params=worker_pb2.SamplingParams(max_tokens=6, temperature=0))
            first = await worker_pb2_grpc.WorkerStub(pch).Prefill(gen, timeout=60)
            await worker_pb2_grpc.WorkerStub(pch).Abort(worker_pb2.AbortRequest(request_id="gone"), timeout=10)
            req = worker_pb2.DecodeRequest(request=gen, handle=first.handle, first_token_id=first.first.token_ids[0])
            chunks = [c async for c in worker_pb2_grpc.WorkerStub(ch).Decode(req, timeout=60)]
            return first, chunks

    return asyncio.run(run())


def test_failed_pull_fails_loudly_under_the_fail_policy(clusters):
    session = clusters["nixl"]
    (d0,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _decode_with_bogus_handle(session)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "KV transfer failed" in err.value.details()
    (d,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
    assert d.kv_transfer_failures_total - d0.kv_transfer_failures_total == 1
    assert d.kv_recompute_total == d0.kv_recompute_total
    assert worker_leaks(session) == []


def test_failed_pull_recomputes_and_counts_it_under_the_recompute_policy(clusters):
    session = clusters["grpc"]
    (d0,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
    first, chunks = _decode_with_bogus_handle(session)
    tokens = list(first.first.token_ids) + [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 6 and chunks[-1].finish_reason
    (d,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
    assert d.kv_recompute_total - d0.kv_recompute_total == 1
    # Same tokens as an undisturbed greedy run of the prompt on the mixed worker.
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    (m,) = clusters["mixed"].workers

    async def reference():
        async with grpc.aio.insecure_channel(m["address"]) as ch:
            gen = worker_pb2.GenerateRequest(request_id="ref", prompt_token_ids=list(range(200, 240)),
                                             params=worker_pb2.SamplingParams(max_tokens=6, temperature=0))
            return [t async for c in worker_pb2_grpc.WorkerStub(ch).Generate(gen, timeout=60) for t in c.token_ids]

    assert tokens == asyncio.run(reference())
    assert worker_leaks(session) == []


def test_bad_inputs_get_openai_errors_over_the_cluster(clusters):
    session = clusters["nixl"]
    client = _client(session)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{session.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        _chat(session, "hi", max_tokens=100_000)
    assert "maximum context length" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        _chat(session, "hi", temperature=-1)
    assert worker_leaks(session) == []


def test_no_decode_worker_is_503_and_a_layout_mismatch_is_reported_at_handshake(clusters, redis_server):
    import ray

    from cluster.worker.actor import WorkerActor

    cfg = cluster_config("mismatch", engine=ENGINE)
    p_spec = cfg.worker_spec("prefill", redis_server.url).model_dump()
    d_spec = cfg.worker_spec("decode", redis_server.url).model_dump()
    d_spec["engine"]["block_size"] = 8  # a different KV layout
    from cluster.launch import ServeSession

    session = ServeSession(cfg.model_copy(update={"redis_url": redis_server.url}))
    session.start_state()
    session.actors = [WorkerActor.remote(p_spec)]
    try:
        session.workers = ray.get([a.start.remote() for a in session.actors], timeout=300)
        url = session.start_router(port=0)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
        with pytest.raises(openai.InternalServerError) as err:  # 503
            client.completions.create(model=model, prompt="hello", max_tokens=2)
        assert err.value.status_code == 503 and "decode" in str(err.value)

        d = WorkerActor.remote(d_spec)
        session.actors.append(d)
        session.workers.append(ray.get(d.start.remote(), timeout=300))
        deadline = time.monotonic() + 20
        errors = {}
        while time.monotonic() < deadline and not errors:
            errors = ray.get(d.peer_errors.remote())
            time.sleep(0.3)
        (message,) = errors.values()
        assert "block_size=16" in message and "block_size=8" in message, message
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=model, prompt="hello", max_tokens=2)
        assert err.value.status_code == 503 and "KV layout" in str(err.value)
        assert worker_leaks(session) == []
    finally:
        session.stop()


def test_pdserve_bench_against_the_cluster(clusters, tmp_path):
    """The benchmark client against pdserve's own router (its unit tests use a stand-in server)."""
    import json

    from cluster.cli import main

    session = clusters["nixl"]
    out = tmp_path / "bench.json"
    rc = main(["bench", "--base-url", session.url, "--api-key", KEY, "--dataset", "random", "--input-len", "32",
               "--output-len", "4", "--num-prompts", "6", "--request-rate", "inf", "--max-concurrency", "3",
               "--disable-tqdm", "--result-json", str(out), "--plot", str(tmp_path / "bench.png"),
               "--goodput", "ttft:60000"])
    assert rc == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 24  # ignore_eos + min_tokens: exactly 4 each
    assert summary["ttft_ms"]["median"] > 0 and summary["good_requests"] == 6
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert worker_leaks(session) == []


def test_decode_worker_killed_mid_stream_is_resumed_on_another_one(clusters, redis_server):
    """A decode worker dies (process killed) while streaming: the router resumes the request on
    the other decode worker from the tokens already streamed (KV recomputed there, counted), and
    the client sees one stream equal to an uninterrupted one; the next requests skip the dead one."""
    import ray

    cfg = cluster_config("faults", engine=ENGINE, prefill=1, decode=2)
    with running_cluster(cfg, redis_server.url) as session:
        client = openai.OpenAI(base_url=f"{session.url}/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        body = dict(model=model, prompt="Write a long story about a dragon.", max_tokens=160, temperature=0,
                    extra_body={"ignore_eos": True})
        reference = client.completions.create(**body).choices[0].text
        stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        pieces = [next(chunks)]
        # The first token comes from the prefill worker: wait for a decoder to report the request.
        deadline = time.monotonic() + 10
        while True:
            busy = [w for w in worker_stats(session).items() if w[0].startswith("decode") and w[1].num_requests_running]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        (victim_key, _), = busy
        index = [f"{w['role']}:{w['worker_id']}" for w in session.workers].index(victim_key)
        ray.kill(session.actors[index])
        pieces += list(chunks)  # no error: the stream goes on from the other decoder
        text = "".join(c.choices[0].text for c in pieces if c.choices)
        assert text == reference
        assert pieces[-1].usage.completion_tokens == 160
        del session.actors[index], session.workers[index]
        (survivor,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
        assert survivor.requests_resumed_total == 1
        assert "pdserve:router_resumes_total 1.0" in httpx.get(f"{session.url}/metrics", timeout=30).text
        for i in range(3):  # the dead worker is skipped (marked down, then gone from the registry)
            out = client.completions.create(model=model, prompt=f"Say {i}.", max_tokens=3, temperature=0)
            assert out.choices[0].text
        assert worker_leaks(session) == []
