"""Dynamic role switching end to end: Ray actors as workers, real Redis, real KV transfers, the
router's admin API over real HTTP and user traffic through the official `openai` client.

One cluster, 1 prefill + 2 decode workers, float32 (greedy outputs do not depend on the batch, so
answers served across switches can be compared token for token with answers served before).
"""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.cluster_harness import TEST_ENGINE, cluster_config, ray_session, running_cluster, worker_leaks, worker_stats

pytestmark = pytest.mark.slow

ENGINE = TEST_ENGINE.model_copy(update={"dtype": "float32"})
KEY = "sk-user"
ADMIN = "sk-admin"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in French."]


@pytest.fixture(scope="module")
def session(redis_server):
    with ray_session():
        config = cluster_config("switch", engine=ENGINE, prefill=1, decode=2, api_keys=(KEY,),
                                admin_api_keys=(ADMIN,), kv_transport="grpc")
        with running_cluster(config, redis_server.url) as s:
            yield s


def admin(session, method: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{session.url}/admin{path}", headers=headers, timeout=30, **kw)


def workers(session) -> dict[str, dict]:
    resp = admin(session, "GET", "/workers")
    assert resp.status_code == 200, resp.text
    return {w["id"]: w for w in resp.json()["data"]}


def wait_phase_ready(session, worker_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        w = admin(session, "GET", f"/workers/{worker_id}").json()
        if w["phase"] in ("ready", "failed") or time.monotonic() > deadline:
            return w
        time.sleep(0.1)


def chat(session, question: str, max_tokens: int = 24, **kw) -> str:
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=max_tokens, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


@pytest.fixture(scope="module")
def reference(session):
    """Answers before any switch (the same cluster, so the same numerics)."""
    return {q: chat(session, q) for q in QUESTIONS}


def decode_ids(session) -> list[str]:
    return sorted(w["worker_id"] for w in session.workers if w["role"] == "decode")


def busy_decoder(session, timeout: float = 60.0) -> str:
    """The decode worker that runs a request now (the test's one long stream)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = {k.split(":", 1)[1]: s.num_requests_running for k, s in worker_stats(session).items()}
        busy = next((wid for wid in decode_ids(session) if running.get(wid)), None)
        if busy is not None:
            return busy
        time.sleep(0.05)
    raise AssertionError("the long stream never reached a decode worker")


def test_admin_api_lists_workers_and_only_opens_to_the_admin_key(session):
    data = workers(session)
    assert len(data) == 3
    for w in data.values():
        assert w["phase"] == "ready" and w["epoch"] >= 1 and w["expert_parallel_size"] == 1 and w["address"]
        assert set(w["load"]) == {"running", "waiting", "queued_prefill_tokens", "kv_usage"}
        assert w["history"][0]["phase"] == "ready"
    assert sorted(w["role"] for w in data.values()) == ["decode", "decode", "prefill"]
    one = next(iter(data))
    assert admin(session, "GET", f"/workers/{one}").json()["id"] == one
    for key in (KEY, None, "wrong"):  # a user key does not open the admin API
        resp = admin(session, "GET", "/workers", key=key)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    missing = admin(session, "GET", "/workers/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert admin(session, "POST", "/workers/nope/role", json={"role": "prefill"}).status_code == 404


def test_bad_switch_requests_are_refused_and_change_nothing(session):
    wid = decode_ids(session)[0]
    before = workers(session)[wid]
    stale = admin(session, "POST", f"/workers/{wid}/role", json={"role": "prefill", "expected_epoch": 99})
    assert stale.status_code == 409 and "epoch" in stale.json()["error"]["message"]
    bad = admin(session, "POST", f"/workers/{wid}/role", json={"role": "router"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    extra = admin(session, "POST", f"/workers/{wid}/role", json={"role": "prefill", "bogus": 1})
    assert extra.status_code == 400
    same = admin(session, "POST", f"/workers/{wid}/role", json={"role": "decode", "expected_epoch": before["epoch"]})
    assert same.status_code == 200 and same.json()["epoch"] == before["epoch"]
    after = workers(session)[wid]
    assert (after["role"], after["epoch"], after["phase"]) == ("decode", before["epoch"], "ready")


def test_switch_while_streams_run_keeps_every_answer_and_bumps_the_epoch(session, reference):
    wid = decode_ids(session)[1]
    start = workers(session)[wid]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, session, q) for q in QUESTIONS * 2]
        busy_decoder(session)  # streams are running (on either decode worker) when the switch lands
        resp = admin(session, "POST", f"/workers/{wid}/role",
                     json={"role": "prefill", "expected_epoch": start["epoch"], "drain_timeout_s": 60})
        assert resp.status_code == 202, resp.text
        # Traffic sent during the switch goes elsewhere, with no error the client can see.
        futures += [pool.submit(chat, session, q) for q in QUESTIONS]
        answers = [f.result(timeout=180) for f in futures]
    assert answers == [reference[q] for q in QUESTIONS * 3]
    w = wait_phase_ready(session, wid)
    assert (w["role"], w["epoch"], w["phase"]) == ("prefill", start["epoch"] + 1, "ready"), w
    phases = [e["phase"] for e in w["history"]]
    assert phases[-1] == "ready" and "fenced" in phases and "switching" in phases
    assert w["role_switches_total"] >= 1
    # Now 2 prefill + 1 decode: the switched worker serves prefills, its KV moves to the other decode worker.
    assert [chat(session, q) for q in QUESTIONS] == [reference[q] for q in QUESTIONS]
    stats = {k.split(":", 1)[1]: s for k, s in worker_stats(session).items()}
    assert stats[wid].role == 1 and stats[wid].epoch == start["epoch"] + 1  # ROLE_PREFILL
    # And back, so the next tests start from 1P+2D.
    back = admin(session, "POST", f"/workers/{wid}/role", json={"role": "decode", "expected_epoch": w["epoch"]})
    assert back.status_code == 202
    w2 = wait_phase_ready(session, wid)
    assert (w2["role"], w2["epoch"]) == ("decode", start["epoch"] + 2)
    assert worker_leaks(session) == []


def test_drain_timeout_rolls_back_and_the_long_stream_is_untouched(session):
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def long_stream() -> int:
            stream = client.completions.create(model=model, prompt="Write a long story about a dragon.",
                                               max_tokens=400, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
            usage = [c.usage for c in stream if c.usage]
            return usage[-1].completion_tokens

        fut = pool.submit(long_stream)
        busy = busy_decoder(session)
        epoch = workers(session)[busy]["epoch"]
        resp = admin(session, "POST", f"/workers/{busy}/role", json={"role": "prefill", "drain_timeout_s": 1.0})
        assert resp.status_code == 202, resp.text
        again = admin(session, "POST", f"/workers/{busy}/role", json={"role": "mixed"})
        assert again.status_code == 409 and "already switching" in again.json()["error"]["message"]
        w = wait_phase_ready(session, busy)
        assert (w["role"], w["epoch"], w["phase"]) == ("decode", epoch, "ready"), w
        assert "drain timed out" in w["reason"] and w["role_rollbacks_total"] >= 1
        assert "rolling_back" in [e["phase"] for e in w["history"]]
        assert fut.result(timeout=300) == 400  # every token, no error
    assert worker_leaks(session) == []


def test_migrating_switch_hands_running_streams_over_without_a_visible_seam(session):
    """migrate=true: the decode worker does not wait for its 300-token stream; the router moves it
    to the other decode worker (with its KV, pulled over the transport), and the client's text
    equals an uninterrupted run's."""
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    body = dict(model=model, prompt="Write a long story about a knight.", max_tokens=300, temperature=0,
                extra_body={"ignore_eos": True})
    reference = client.completions.create(**body).choices[0].text

    def resumed_totals() -> dict[str, int]:
        return {k.split(":", 1)[1]: s.sequences_migrated_in_total for k, s in worker_stats(session).items()}

    before = resumed_totals()
    stream = iter(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    pieces = [next(stream)]
    busy = busy_decoder(session)
    epoch = workers(session)[busy]["epoch"]
    resp = admin(session, "POST", f"/workers/{busy}/role",
                 json={"role": "prefill", "expected_epoch": epoch, "migrate": True, "drain_timeout_s": 5})
    assert resp.status_code == 202, resp.text
    w = wait_phase_ready(session, busy, timeout=30)
    assert (w["role"], w["epoch"]) == ("prefill", epoch + 1), w  # no drain timeout: the stream moved
    assert "migrating" in [e["phase"] for e in w["history"]]
    pieces += list(stream)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == reference
    assert pieces[-1].usage.completion_tokens == 300
    after = resumed_totals()
    (other,) = [wid for wid in decode_ids(session) if wid != busy]
    assert after[other] - before[other] == 1
    back = admin(session, "POST", f"/workers/{busy}/role", json={"role": "decode", "expected_epoch": epoch + 1})
    assert back.status_code == 202 and wait_phase_ready(session, busy)["role"] == "decode"
    assert worker_leaks(session) == []


def test_registry_follows_the_worker_and_reregistration_keeps_the_switch(session):
    """The worker is the only writer of its role: the registry shows each switch, and a worker
    whose registration expired re-registers with its current role and epoch."""
    import asyncio

    from cluster.state.store import Store

    wid = decode_ids(session)[0]
    epoch0 = workers(session)[wid]["epoch"]
    assert admin(session, "POST", f"/workers/{wid}/role",
                 json={"role": "mixed", "expected_epoch": epoch0}).status_code == 202
    w = wait_phase_ready(session, wid)
    assert (w["role"], w["epoch"]) == ("mixed", epoch0 + 1)

    async def registry() -> tuple[str, int, list]:
        store = Store.from_url(session.redis_url, "switch")
        try:
            info = await store.get_worker(wid)
            events = [e for _, e in await store.read_events() if e.get("worker_id") == wid]
            await store.deregister(wid)  # as if the registration expired
            deadline = time.monotonic() + 15
            again = None
            while again is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                again = await store.get_worker(wid)
            return (info.role, info.epoch, events, again)
        finally:
            await store.close()

    role, epoch, events, again = asyncio.run(registry())
    assert (role, epoch) == ("mixed", w["epoch"])
    assert events and events[-1]["role"] == "mixed" and int(events[-1]["epoch"]) == w["epoch"]
    assert again is not None and (again.role, again.epoch) == ("mixed", w["epoch"])
    back = admin(session, "POST", f"/workers/{wid}/role", json={"role": "decode", "expected_epoch": w["epoch"]})
    assert back.status_code == 202
    assert wait_phase_ready(session, wid)["role"] == "decode"


def scrape(session) -> dict[tuple[str, str, str], float]:
    """/metrics samples by (name, worker, phase), summed over any other label (e.g. role)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{session.url}/metrics", timeout=30).text
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            key = (s.name, s.labels.get("worker", ""), s.labels.get("phase", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_switch_metrics_time_each_phase_and_count_migrated_sequences(session):
    """A migrating switch with one running stream, then a draining switch back: on /metrics the
    worker's phase histogram gains one observation per phase it went through (fence -> ready as
    `total`, its sum equal to what Health's history shows), and sequences_migrated_total gains the
    one stream, which the other decode worker's sequences_migrated_in_total counts in."""
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    before = scrape(session)
    stream = iter(client.completions.create(model=model, prompt="Write a long story about a wizard.", max_tokens=300,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    next(stream)
    busy = busy_decoder(session)
    (other,) = [wid for wid in decode_ids(session) if wid != busy]
    epoch = workers(session)[busy]["epoch"]
    assert admin(session, "POST", f"/workers/{busy}/role",
                 json={"role": "prefill", "expected_epoch": epoch, "migrate": True}).status_code == 202
    assert wait_phase_ready(session, busy)["role"] == "prefill"
    assert len(list(stream)) > 0  # the stream went on elsewhere
    assert admin(session, "POST", f"/workers/{busy}/role",
                 json={"role": "decode", "expected_epoch": epoch + 1}).status_code == 202
    w = wait_phase_ready(session, busy)
    assert (w["role"], w["epoch"]) == ("decode", epoch + 2)
    after = scrape(session)

    def grew(name: str, worker: str, phase: str = "") -> float:
        return after.get((name, worker, phase), 0.0) - before.get((name, worker, phase), 0.0)

    h = "pdserve:role_switch_phase_seconds"
    assert {p: grew(f"{h}_count", busy, p) for p in ("fenced", "migrating", "draining", "switching", "total",
                                                     "total_rolled_back")} == \
        {"fenced": 2, "migrating": 1, "draining": 0, "switching": 2, "total": 2, "total_rolled_back": 0}
    history = w["history"]
    fenced = [e["ts"] for e in history if e["phase"] == "fenced"][-2:]
    readies = [e["ts"] for e in history if e["phase"] == "ready"][-2:]
    assert grew(f"{h}_sum", busy, "total") == pytest.approx(sum(r - f for f, r in zip(fenced, readies)), abs=1e-6)
    assert grew("pdserve:sequences_migrated_total", busy) == 1
    assert grew("pdserve:sequences_migrated_total", other) == 0
    assert grew("pdserve:sequences_migrated_in_total", other) == 1
    assert grew("pdserve:migration_recompute_total", other) == 0
    assert grew(f"{h}_count", other, "total") == 0  # the other worker did not switch
    assert worker_leaks(session) == []
