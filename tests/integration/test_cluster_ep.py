"""Expert-parallel workers in the served cluster: Ray started by the test, real Redis, real NIXL
KV transfer, the router over real HTTP driven by the official `openai` client.

Three clusters on the tiny ERNIE-4.5 MoE (8 experts, top-2, MoE layers 1 and 2; float32, so greedy
tokens do not depend on the batch): a prefill worker with EP=2 feeding a decode worker with EP=1,
an EP=1 prefill worker feeding an EP=2 decode worker (imported KV must reach every rank), and two
mixed workers, one EP=2 and one EP=1. The checkpoint gets a one-character-per-token tokenizer, so a reply's text
gives back its token ids exactly.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from cluster.config import WorkerGroup
from tests.cluster_harness import (TEST_ENGINE, cluster_config, ep_rank_pids, pids_still_running, ray_session,
                                   running_clusters, switch_role, worker_leaks, worker_stats)

pytestmark = pytest.mark.slow

# 256 distinct one-character tokens: printable ASCII (so prompts are readable), then Latin Extended.
ALPHABET = [chr(c) for c in range(32, 127)] + [chr(0x100 + i) for i in range(256 - 95)]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Count to five, slowly."]
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
MAX_TOKENS = 8
LONG_CONTEXT = 4096
LONG_STREAM = 3000  # tokens: seconds of decoding even at the tiny model's fastest
TOP_K = 2  # the tiny MoE routes each token to 2 experts
ADMIN = "sk-ep-admin"
SWITCH_STREAM = 160  # tokens per stream in the switch test: still decoding when the switch lands
EXPERT_LINE = re.compile(r'^pdserve:expert_tokens_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def _ids(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def _with_char_tokenizer(src: Path, dst: Path) -> Path:
    """Copy checkpoint `src` to `dst` with a tokenizer mapping each character of ALPHABET to one id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(dst)
    # A longer context than the shared tiny config's, so the killed-rank test's streams outlast
    # its placement loop even on a fast machine (default rotary: the weights do not depend on it).
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = LONG_CONTEXT
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def moe(tiny_checkpoint, tmp_path_factory) -> Path:
    return _with_char_tokenizer(tiny_checkpoint("ernie45_moe"), tmp_path_factory.mktemp("ep") / "moe")


@pytest.fixture(scope="module")
def engine_args(moe):
    return TEST_ENGINE.model_copy(update={"model": str(moe), "dtype": "float32", "max_model_len": LONG_CONTEXT,
                                          "num_kv_blocks": 1536})


@pytest.fixture(scope="module")
def clusters(redis_server, engine_args):
    pd_cfg = cluster_config("ep-pd", engine=engine_args,
                            workers=(WorkerGroup(role="prefill", expert_parallel_size=2), WorkerGroup(role="decode")))
    dp_cfg = cluster_config("ep-dp", engine=engine_args,
                            workers=(WorkerGroup(role="prefill"), WorkerGroup(role="decode", expert_parallel_size=2)))
    # Mixed workers move no KV: gRPC transport spares them NIXL's start-up (seconds each here).
    mixed_cfg = cluster_config("ep-mixed", engine=engine_args, kv_transport="grpc", admin_api_keys=(ADMIN,),
                               workers=(WorkerGroup(role="mixed", expert_parallel_size=2), WorkerGroup(role="mixed")))
    # 2 + 1 CPUs for P (EP=2) and D, 1 + 2 for P and D (EP=2), 2 + 1 for the mixed pair, 2 for the
    # prefill worker the last test adds: what the workers reserve.
    with ray_session(num_cpus=11):
        with running_clusters([pd_cfg, dp_cfg, mixed_cfg], redis_server.url) as (pd, dp, mixed):
            pids = [p for s in (pd, dp, mixed) for ps in ep_rank_pids(s).values() for p in ps]
            yield {"pd": pd, "dp": dp, "mixed": mixed}
    assert len(pids) == 3  # one killed by a test, two stopped with their (healthy) workers
    assert pids_still_running(pids) == [], "expert-parallel ranks outlived their cluster"


@pytest.fixture(scope="module")
def offline(moe):
    """Greedy token ids of the offline EP=1 `LLM` for QUESTIONS (chat) and PROMPTS (completions)."""
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with LLM(str(moe), dtype="float32", num_kv_blocks=128, max_model_len=512) as llm:
        chats = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
        comps = llm.generate(PROMPTS, params)
    return [list(o.outputs[0].token_ids) for o in chats], [list(o.outputs[0].token_ids) for o in comps]


def _client(session) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{session.url}/v1", api_key="none", max_retries=0, timeout=60)


def _expert_tokens(session) -> dict[tuple[str, str], dict[str, float]]:
    """pdserve:expert_tokens_total from /metrics: {(worker, layer): {expert: tokens}}."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for line in httpx.get(f"{session.url}/metrics", timeout=30).text.splitlines():
        m = EXPERT_LINE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            out[labels["worker"], labels["layer"]][labels["expert"]] = float(m["value"])
    return out


def _by_ep(session) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for w in session.workers:
        out[w["expert_parallel_size"]].append(w)
    return out


def test_ep_workers_give_the_offline_greedy_tokens(clusters, offline):
    pd = clusters["pd"]
    assert sorted((w["role"], w["expert_parallel_size"]) for w in pd.workers) == [("decode", 1), ("prefill", 2)]
    chat_ref, comp_ref = offline

    async def ask(session):
        client = openai.AsyncOpenAI(base_url=f"{session.url}/v1", api_key="none", max_retries=0, timeout=60)
        model = (await client.models.list()).data[0].id
        # Concurrent, so EP=2 batches hold several sequences (rank 1 then routes its share of them)
        # and the router spreads the mixed cluster's requests over both workers.
        chats = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=MAX_TOKENS) for q in QUESTIONS]
        comps = [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=MAX_TOKENS)
                 for p in PROMPTS]
        out = await asyncio.gather(*chats, *comps)
        return ([_ids(r.choices[0].message.content) for r in out[:len(QUESTIONS)]],
                [_ids(r.choices[0].text) for r in out[len(QUESTIONS):]])

    def decode_of(session):
        (d,) = [s for k, s in worker_stats(session).items() if k.startswith("decode")]
        return d

    # Counter differences across this test's requests (the clusters are module-scoped).
    before = {"pd": decode_of(pd), "dp": decode_of(clusters["dp"])}
    mixed_before = {k: s.prompt_tokens_total for k, s in worker_stats(clusters["mixed"]).items()}
    for name, session in clusters.items():
        chats, comps = asyncio.run(ask(session))
        assert chats == chat_ref, name
        assert comps == comp_ref, name
    stats = worker_stats(pd)
    (prefill,) = [s for k, s in stats.items() if k.startswith("prefill")]
    for name, ep_size in (("pd", 1), ("dp", 2)):
        d0, d1 = before[name], decode_of(clusters[name])
        assert d1.expert_parallel_size == ep_size, name
        assert d1.kv_transfers_total > d0.kv_transfers_total, name
        assert d1.kv_transfer_bytes_total > d0.kv_transfer_bytes_total, name
        assert d1.kv_recompute_total == d0.kv_recompute_total, name
        assert d1.kv_transfer_failures_total == d0.kv_transfer_failures_total, name
    assert prefill.expert_parallel_size == 2
    # Both mixed workers served some of the requests (the EP=2 one included).
    mixed_after = {k: s.prompt_tokens_total for k, s in worker_stats(clusters["mixed"]).items()}
    assert all(mixed_after[k] > mixed_before[k] for k in mixed_after), (mixed_before, mixed_after)
    for session in clusters.values():
        assert worker_leaks(session) == []


def _switch(session, wid: str, role: str, migrate: bool = False) -> dict:
    return switch_role(session, ADMIN, wid, role, migrate)


def test_ep_group_switches_role_as_a_whole_while_its_streams_move(clusters):
    """The EP=2 mixed worker (two ranks that compute each step together) turns prefill with
    migrate while it decodes three greedy streams: they move to the EP=1 mixed worker with their KV and
    finish with the tokens of an unswitched run; the group's epoch moves once per switch, as one
    worker, and it turns back to mixed with no block left behind."""
    mixed = clusters["mixed"]
    ep2 = _by_ep(mixed)[2][0]["worker_id"]
    ep1 = _by_ep(mixed)[1][0]["worker_id"]
    client = _client(mixed)
    model = client.models.list().data[0].id
    body = dict(model=model, temperature=0, max_tokens=SWITCH_STREAM, extra_body={"ignore_eos": True})
    reference = [client.completions.create(prompt=p, **body).choices[0].text for p in PROMPTS]

    def stats_of(wid):
        return next(s for k, s in worker_stats(mixed).items() if k.endswith(wid))

    _switch(mixed, ep1, "prefill")  # the EP=2 group is the only decoder while the streams start
    try:
        streams = [iter(client.completions.create(prompt=p, stream=True, **body)) for p in PROMPTS]
        heads = [[next(s) for _ in range(3)] for s in streams]  # decoding on the EP=2 group now
    finally:
        _switch(mixed, ep1, "mixed")
    before_out, before_in = stats_of(ep2), stats_of(ep1)
    w = _switch(mixed, ep2, "prefill", migrate=True)
    assert "migrating" in [e["phase"] for e in w["history"]] and w["expert_parallel_size"] == 2
    texts = ["".join(c.choices[0].text for c in h + list(s) if c.choices) for h, s in zip(heads, streams)]
    assert texts == reference
    after_out, after_in = stats_of(ep2), stats_of(ep1)
    assert after_out.sequences_migrated_total - before_out.sequences_migrated_total == len(PROMPTS)
    assert after_in.sequences_migrated_in_total - before_in.sequences_migrated_in_total == len(PROMPTS)
    assert after_in.migration_recompute_total == before_in.migration_recompute_total
    assert after_in.requests_resumed_total == before_in.requests_resumed_total  # pulled, not recomputed
    # Meanwhile the EP=1 mixed worker serves new requests alone (the router keeps them colocated).
    fresh = "Zq9 a prompt for the switched group"
    got = client.completions.create(prompt=fresh, **{**body, "max_tokens": MAX_TOKENS}).choices[0].text
    back = _switch(mixed, ep2, "mixed")
    assert back["epoch"] == w["epoch"] + 1
    again = client.completions.create(prompt=fresh, **{**body, "max_tokens": MAX_TOKENS}).choices[0].text
    assert again == got
    assert worker_leaks(mixed) == []


def test_expert_token_counts_on_metrics(clusters):
    """One fresh prompt of L tokens: on the EP=2 prefill worker every MoE layer routes L x top_k more
    tokens; on the decode worker (MAX_TOKENS - 1 forwards) (MAX_TOKENS - 1) x top_k."""
    pd = clusters["pd"]
    (p,) = _by_ep(pd)[2]
    (d,) = _by_ep(pd)[1]
    before = _expert_tokens(pd)
    assert {layer for _, layer in before} == {"0", "1"}  # the two MoE layers
    assert all(set(experts) == {str(e) for e in range(8)} for experts in before.values())
    prompt = "Zq7 a prompt no earlier request shared a block with"
    client = _client(pd)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, temperature=0,
                                    max_tokens=MAX_TOKENS)
    assert out.usage.completion_tokens == MAX_TOKENS
    after = _expert_tokens(pd)
    for layer in ("0", "1"):
        def delta(worker):
            return sum(after[worker["worker_id"], layer].values()) - sum(before[worker["worker_id"], layer].values())
        assert delta(p) == len(prompt) * TOP_K, layer
        assert delta(d) == (MAX_TOKENS - 1) * TOP_K, layer
    metrics = httpx.get(f"{pd.url}/metrics", timeout=30).text
    assert f'pdserve:expert_parallel_size{{role="prefill",worker="{p["worker_id"]}"}} 2.0' in metrics


def _stats(session, worker: dict):
    """One worker's StatsResponse (worker_stats asks every worker, a failed one included)."""
    import ray

    from pdserve.v1 import worker_pb2

    actor = session.actors[session.workers.index(worker)]
    return worker_pb2.StatsResponse.FromString(ray.get(actor.stats.remote(), timeout=30))


def _health(worker: dict):
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    async def ask():
        async with grpc.aio.insecure_channel(worker["address"]) as ch:
            return await worker_pb2_grpc.WorkerStub(ch).Health(worker_pb2.HealthRequest(), timeout=10)

    return asyncio.run(ask())


def _registered(redis_server, session, gone: str, within: float) -> set[str]:
    """The cluster's registered worker ids once `gone` has left the registry (or after `within` s)."""
    from cluster.state.store import Store

    async def poll() -> set[str]:
        store = Store.from_url(redis_server.url, session.config.cluster)
        try:
            deadline = time.monotonic() + within
            while True:
                ids = {w.worker_id for w in await store.list_workers()}
                if gone not in ids or time.monotonic() > deadline:
                    return ids
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    return asyncio.run(poll())


def _drain(stream) -> tuple[str, float]:
    """Read a stream to its end: ("ok" or the error text, when it ended)."""
    try:
        for _ in stream:
            pass
        return "ok", time.monotonic()
    except Exception as exc:  # noqa: BLE001 - the error event of a failed stream
        return f"{type(exc).__name__}: {exc}", time.monotonic()


def test_killed_rank_fails_fast_and_the_other_worker_keeps_serving(clusters, redis_server):
    """SIGKILL rank 1 of the EP=2 mixed worker while it streams: its streams fail over at once (the
    worker answers UNAVAILABLE naming the rank) and the router resumes them on the other worker,
    so every client stream finishes; the worker reports unhealthy and leaves the registry, the
    other worker's own streams are untouched and the next requests go there."""
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    session = clusters["mixed"]
    (ep,) = _by_ep(session)[2]
    (other,) = _by_ep(session)[1]
    (rank_pid,) = ep_rank_pids(session)[ep["worker_id"]]
    client = _client(session)
    model = client.models.list().data[0].id
    # Long streams until each worker runs at least one (the router picks by free KV blocks first,
    # as last heartbeated, so it may put several on one worker).
    streams = []
    for i in range(6):
        stream = client.completions.create(model=model, prompt=f"Tell a long story, part {i}.", temperature=0,
                                           max_tokens=LONG_STREAM, stream=True)
        it = iter(stream)
        next(it)
        streams.append(it)
        running = {k.split(":", 1)[1]: s.num_requests_running for k, s in worker_stats(session).items()}
        if running[ep["worker_id"]] >= 1 and running[other["worker_id"]] >= 1:
            break
        time.sleep(1.2)  # let a heartbeat report the load
    assert running[ep["worker_id"]] >= 1 and running[other["worker_id"]] >= 1, running
    on_ep = running[ep["worker_id"]]
    resumed_before = _stats(session, other).requests_resumed_total
    os.kill(rank_pid, signal.SIGKILL)
    with ThreadPoolExecutor(len(streams)) as pool:
        results = list(pool.map(_drain, streams))
    assert [r for r, _ in results if r != "ok"] == [], results  # resumed, not failed
    assert _stats(session, other).requests_resumed_total - resumed_before == on_ep

    health = _health(ep)
    assert not health.ready and "rank 1" in health.message, health
    assert _registered(redis_server, session, gone=ep["worker_id"], within=5) == {other["worker_id"]}
    before = _stats(session, other).prompt_tokens_total
    for i in range(3):
        out = client.completions.create(model=model, prompt=f"Say {i}.", temperature=0, max_tokens=3)
        assert out.usage.completion_tokens == 3
    assert _stats(session, other).prompt_tokens_total == before + sum(len(f"Say {i}.") for i in range(3))

    async def direct():  # a request sent straight to the failed worker is refused at once
        async with grpc.aio.insecure_channel(ep["address"]) as ch:
            req = worker_pb2.GenerateRequest(request_id="late", prompt_token_ids=[1, 2, 3],
                                             params=worker_pb2.SamplingParams(max_tokens=2, temperature=0))
            return [c async for c in worker_pb2_grpc.WorkerStub(ch).Generate(req, timeout=10)]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(direct())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "rank 1" in err.value.details()
    assert pids_still_running([rank_pid], timeout=5) == []
    assert worker_leaks(session, skip={ep["worker_id"]}) == []


def test_rank_dying_while_idle_takes_the_worker_out_within_a_heartbeat(clusters, redis_server):
    """No request in flight to notice it: a second EP=2 prefill worker's housekeeping sees its rank's
    process gone, fails the engine and deregisters; requests keep going to the first one."""
    import ray

    pd = clusters["pd"]
    spec = pd.config.worker_spec("prefill", pd.redis_url, expert_parallel_size=2)
    assert spec.engine.expert_parallel_size == 2
    actor = pd.create_worker(spec)  # in a placement group of its own, like the cluster's
    pd.actors.append(actor)  # stopped with the cluster
    pd.workers.append(extra := ray.get(actor.start.remote(), timeout=120))
    (rank_pid,) = ray.get(actor.ep_pids.remote())
    os.kill(rank_pid, signal.SIGKILL)
    killed = time.monotonic()
    assert extra["worker_id"] not in _registered(redis_server, pd, gone=extra["worker_id"], within=10)
    assert time.monotonic() - killed < 10
    health = _health(extra)
    assert not health.ready and "rank 1" in health.message, health
    client = _client(pd)
    for i in range(2):
        out = client.completions.create(model=client.models.list().data[0].id, prompt=f"Hello {i}", temperature=0,
                                        max_tokens=2)
        assert out.usage.completion_tokens == 2
    assert pids_still_running([rank_pid], timeout=5) == []
    assert worker_leaks(pd, skip={extra["worker_id"]}) == []
