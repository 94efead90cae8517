"""Live migration: a migrating role switch moves each running decode sequence to another decode
worker with its KV (pinned on the worker it leaves under a lease, pulled over the KV transport),
and the target continues from the exact state: the same tokens as an unmigrated run, greedy and
seeded, and both choices of an n=2 request. A failed pull falls back to recomputing the sequence there, counted.

Two 1P+2D clusters (Ray actors, real Redis, the admin API and the `openai` client over HTTP),
float32 default model: one over NIXL; one over gRPC whose KV leases last 1 ms, so that every pull
finds its lease gone (prompt KV is then recomputed by the `recompute` policy, and a moved
sequence by the migration's own fallback).
"""
from __future__ import annotations

import time

import openai
import pytest

from tests.cluster_harness import (TEST_ENGINE, cluster_config, ray_session, running_clusters, switch_role, worker_leaks,
                                   worker_stats)

pytestmark = pytest.mark.slow

ENGINE = TEST_ENGINE.model_copy(update={"dtype": "float32"})
KEY = "sk-user"
ADMIN = "sk-admin"
PROMPT = "Write a long story about a lighthouse keeper."
SAMPLING = {"greedy": dict(temperature=0), "seeded": dict(temperature=1.0, top_p=0.95, seed=11),
            "two_choices": dict(temperature=1.0, seed=5, n=2)}
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def clusters(redis_server):
    with ray_session():
        common = dict(engine=ENGINE, prefill=1, decode=2, api_keys=(KEY,), admin_api_keys=(ADMIN,))
        configs = [cluster_config("livemig", kv_transport="nixl", **common),
                   cluster_config("livemig-fail", kv_transport="grpc", kv_lease_seconds=0.001,
                                  kv_failure_policy="recompute", **common)]
        with running_clusters(configs, redis_server.url) as sessions:
            yield sessions


def switch(session, wid: str, role: str, migrate: bool = False) -> dict:
    return switch_role(session, ADMIN, wid, role, migrate, timeout=60)


def stats(session) -> dict:
    return {k.split(":", 1)[1]: s for k, s in worker_stats(session).items()}


def moved_mid_stream(session, kinds) -> tuple[dict[str, str], str, str]:
    """Streams of `kinds` (keys of SAMPLING) started on decode worker X, which then switches to
    prefill with migrate while they run; returns (text per kind, X, the other decode worker Y)."""
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    x, y = sorted(w["worker_id"] for w in session.workers if w["role"] == "decode")
    switch(session, y, "prefill")  # while they start, X is the only decode worker
    streams = {k: iter(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                                 extra_body={"ignore_eos": True}, **SAMPLING[k]))
               for k in kinds}
    heads = {k: [next(s) for _ in range(3)] for k, s in streams.items()}  # decoding on X now
    switch(session, y, "decode")
    w = switch(session, x, "prefill", migrate=True)
    assert "migrating" in [e["phase"] for e in w["history"]]
    texts = {k: choice_texts(heads[k] + list(s)) for k, s in streams.items()}
    switch(session, x, "decode")
    return texts, x, y


def choice_texts(chunks) -> tuple[str, ...]:
    """Each choice's text, by index, from a completion's stream chunks."""
    parts: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            parts.setdefault(ch.index, []).append(ch.text)
    return tuple("".join(parts[i]) for i in sorted(parts))


def reference(session) -> dict[str, tuple[str, ...]]:
    client = openai.OpenAI(base_url=f"{session.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    out = {}
    for k, p in SAMPLING.items():
        resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                         extra_body={"ignore_eos": True}, **p)
        out[k] = tuple(c.text for c in sorted(resp.choices, key=lambda c: c.index))
    return out


def grew(after, before, wid: str, field: str) -> int:
    return getattr(after[wid], field) - getattr(before[wid], field)


def test_moved_sequences_continue_from_their_kv_exactly(clusters):
    session = clusters[0]
    ref = reference(session)
    before = stats(session)
    texts, x, y = moved_mid_stream(session, ["greedy", "seeded", "two_choices"])
    assert texts == ref
    assert len(set(texts["two_choices"])) == 2  # two seeded choices, each continued as itself
    after = stats(session)
    assert grew(after, before, x, "sequences_migrated_total") == 4
    assert grew(after, before, y, "sequences_migrated_in_total") == 4  # pulled, not recomputed
    assert grew(after, before, y, "migration_recompute_total") == 0
    assert grew(after, before, y, "requests_resumed_total") == 0
    assert grew(after, before, y, "kv_transfers_total") >= 2 and grew(after, before, y, "kv_transfer_failures_total") == 0
    assert worker_leaks(session) == []  # X's moved blocks were released once Y had them


def test_a_failed_kv_pull_falls_back_to_recompute_and_is_counted(clusters):
    session = clusters[1]
    ref = reference(session)
    before = stats(session)
    texts, x, y = moved_mid_stream(session, ["greedy"])
    assert texts == {"greedy": ref["greedy"]}
    after = stats(session)
    assert grew(after, before, x, "sequences_migrated_total") == 1
    assert grew(after, before, y, "migration_recompute_total") == 1
    assert grew(after, before, y, "sequences_migrated_in_total") == 0
    assert grew(after, before, y, "requests_resumed_total") == 1
    assert grew(after, before, y, "kv_transfer_failures_total") >= 1
    assert worker_leaks(session, timeout=15) == []  # X's lease expired and its blocks were freed
