"""Soak: role switches back and forth under continuous streaming load.

1 prefill + 2 decode workers (Ray actors, real Redis, KV over NIXL), float32 default model. The
reference answers come first, from the same cluster with no switch running. Then several
clients stream fixed greedy prompts through the official `openai` client without pause while a
driver switches roles through the admin API, one worker at a time, alternating a draining and a
migrating switch in each direction, so that there is always a prefill and a decode worker ready
or about to be. Before a worker leaves the decode role the driver waits until it runs a stream,
so every migrating switch has something to hand over.

Afterwards: no request failed, every answer equals its reference, each worker's epoch rose by
exactly one per switch (as the driver saw it and as the registry's events stream recorded it),
and no KV block or lease is left on any worker.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter

import httpx
import openai
import pytest

from tests.cluster_harness import TEST_ENGINE, cluster_config, ray_session, running_cluster, worker_leaks, worker_stats

pytestmark = pytest.mark.slow

ENGINE = TEST_ENGINE.model_copy(update={"dtype": "float32"})
KEY = "sk-user"
ADMIN = "sk-admin"
CLUSTER = "soak"
CLIENTS = 5
MIN_SWITCHES = 20
# Chat and completion prompts of different lengths; each answers max_tokens tokens (ignore_eos).
CHATS = ["What is the capital of France?", "Name three colors.", "Say hello in French.",
         "Explain in one sentence why the sky is blue."]
COMPLETIONS = ["Once upon a time, in a land far away,", "The three laws of motion are",
               "def fibonacci(n):"]
MAX_TOKENS = 24


def admin(url: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                         **kw)


def workers(url: str) -> dict[str, dict]:
    resp = admin(url, "GET", "/workers")
    assert resp.status_code == 200, resp.text
    return {w["id"]: w for w in resp.json()["data"]}


def wait_settled(url: str, worker_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        w = admin(url, "GET", f"/workers/{worker_id}").json()
        if w["phase"] in ("ready", "failed") or time.monotonic() > deadline:
            return w
        time.sleep(0.05)


def wait_running(session, worker_id: str, timeout: float = 30.0, context=lambda: "") -> None:
    """Until `worker_id` runs at least one sequence (the load is continuous, so this comes soon)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = {k.split(":", 1)[1]: s for k, s in worker_stats(session).items()}
        if stats[worker_id].num_requests_running:
            return
        time.sleep(0.02)
    running = {k: (s.role, s.num_requests_running, s.num_requests_waiting, s.num_waiting_for_kv, s.num_holding_kv)
               for k, s in worker_stats(session).items()}
    raise AssertionError(f"worker {worker_id} ran no stream within {timeout:g}s under continuous load; "
                         f"workers (role, running, waiting, waiting_for_kv, holding_kv): {running}; {context()}")


def ask(client: openai.OpenAI, model: str, prompt: tuple[str, str]) -> str:
    kind, text = prompt
    common = dict(model=model, temperature=0, max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True},
                  stream_options={"include_usage": True})
    if kind == "chat":
        stream = client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
        chunks = list(stream)
        out = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        stream = client.completions.create(prompt=text, **common)
        chunks = list(stream)
        out = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS, usage
    return out


@pytest.fixture(scope="module")
def session(redis_server):
    with ray_session():
        config = cluster_config(CLUSTER, engine=ENGINE, prefill=1, decode=2, api_keys=(KEY,),
                                admin_api_keys=(ADMIN,), kv_transport="nixl", drain_timeout_seconds=60)
        with running_cluster(config, redis_server.url) as s:
            yield s


def plan_switch(roles: dict[str, str], turn: int) -> tuple[str, str]:
    """The next (worker, target role): workers take turns in a fixed order, each flipping
    between prefill and decode, skipping a flip that would leave a role with no worker."""
    order = sorted(roles)
    for k in range(len(order)):
        wid = order[(turn + k) % len(order)]
        target = "prefill" if roles[wid] == "decode" else "decode"
        after = {**roles, wid: target}
        if "prefill" in after.values() and "decode" in after.values():
            return wid, target
    raise AssertionError(f"no switch keeps both roles served: {roles}")


def test_twenty_switches_under_streaming_load_lose_nothing(session):
    url = session.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    prompts = [("chat", q) for q in CHATS] + [("completion", p) for p in COMPLETIONS]
    reference = {p: ask(client, model, p) for p in prompts}  # no switch running yet
    assert all(reference.values())
    stats0 = worker_stats(session).values()
    resumed_before = sum(s.requests_resumed_total + s.sequences_migrated_in_total for s in stats0)
    migrated_before = sum(s.sequences_migrated_total for s in stats0)

    stop = threading.Event()
    answers: list[tuple[tuple[str, str], str, float]] = []  # (prompt, text, when it finished)
    failures: list[str] = []
    lock = threading.Lock()

    def load(i: int) -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        for p in itertools.islice(itertools.cycle(prompts), i, None):  # clients start at different prompts
            if stop.is_set():
                return
            try:
                out = ask(c, model, p)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported below
                with lock:
                    failures.append(f"{p}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                answers.append((p, out, time.monotonic()))

    threads = [threading.Thread(target=load, args=(i,), name=f"soak-client-{i}") for i in range(CLIENTS)]
    for t in threads:
        t.start()
    seen_epochs: dict[str, list[int]] = {wid: [w["epoch"]] for wid, w in workers(url).items()}
    switching_since = time.monotonic()
    modes: Counter[tuple[str, bool]] = Counter()
    done: list[tuple[str, str, bool]] = []
    try:
        for turn in range(MIN_SWITCHES + 4):
            now = {wid: w["role"] for wid, w in workers(url).items()}
            wid, target = plan_switch(now, turn)
            # Alternate drain and migrate within each direction, so both reach decode workers.
            migrate = modes[(target, True)] < modes[(target, False)]
            if now[wid] == "decode":
                wait_running(session, wid, context=lambda: (
                    f"{len(done)} switches done {done[-3:]}, {len(answers)} answers, failures {failures[:3]}, "
                    f"admin view {[(w['id'], w['role'], w['phase'], w['ready'], w['load']) for w in workers(url).values()]}"))
            epoch = seen_epochs[wid][-1]
            resp = admin(url, "POST", f"/workers/{wid}/role",
                         json={"role": target, "expected_epoch": epoch, "migrate": migrate, "drain_timeout_s": 60})
            assert resp.status_code == 202, resp.text
            w = wait_settled(url, wid)
            assert (w["phase"], w["role"], w["epoch"]) == ("ready", target, epoch + 1), w
            seen_epochs[wid].append(w["epoch"])
            modes[(target, migrate)] += 1
            done.append((wid, target, migrate))
            with lock:
                assert not failures, failures[:3]
        switching_until = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not any(t.is_alive() for t in threads), "a client never finished its last request"

    assert len(done) >= MIN_SWITCHES
    assert all(n >= 2 for n in (modes[("prefill", True)], modes[("prefill", False)],
                                modes[("decode", True)], modes[("decode", False)])), modes
    assert failures == []
    wrong = [(p, out) for p, out, _ in answers if out != reference[p]]
    assert wrong == [], f"{len(wrong)} of {len(answers)} answers differ from the reference, e.g. {wrong[:2]}"
    during = sum(switching_since < t < switching_until for _, _, t in answers)
    assert during >= 2 * CLIENTS, f"only {during} requests finished while {len(done)} switches ran"
    # Migrating switches handed running streams over, and other decode workers took each in once,
    # with its KV (or, a sequence not between decode steps, by recomputing it).
    stats = worker_stats(session).values()
    resumed = sum(s.requests_resumed_total + s.sequences_migrated_in_total for s in stats) - resumed_before
    assert sum(s.migration_recompute_total for s in stats) == 0  # no KV pull failed
    migrated = sum(s.sequences_migrated_total for s in stats) - migrated_before
    assert migrated >= 1 and resumed == migrated, (migrated, resumed, modes)

    # Epochs: +1 per switch of that worker, as the driver saw them and as the registry recorded them.
    switches_of = Counter(wid for wid, _, _ in done)
    for wid, epochs in seen_epochs.items():
        assert epochs == list(range(epochs[0], epochs[0] + switches_of[wid] + 1)), (wid, epochs)
    events = asyncio.run(role_events(session.redis_url))
    for wid, epochs in seen_epochs.items():
        recorded = [int(e["epoch"]) for e in events if e.get("worker_id") == wid]
        assert recorded == epochs[1:], (wid, recorded, epochs)

    # Nothing left behind: every block free again, no lease, no request tracked.
    assert worker_leaks(session, timeout=20) == []
    for name, s in worker_stats(session).items():
        assert (s.num_free_blocks, s.num_active_leases, s.num_requests_running) == (s.num_blocks, 0, 0), name
    for w in workers(url).values():
        assert w["phase"] == "ready" and w["role_rollbacks_total"] == 0, w


async def role_events(redis_url: str) -> list[dict]:
    from cluster.state.store import Store

    store = Store.from_url(redis_url, CLUSTER)
    try:
        return [e for _, e in await store.read_events(count=10_000)]
    finally:
        await store.close()
