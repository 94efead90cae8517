"""The planner end to end: Ray actors as workers, real Redis, real KV transfers, the planner in
the router process, traffic through the official `openai` client over real HTTP.

1 prefill + 2 decode workers. Long prompts with 2-token answers pile prompt tokens up on the one
prefill worker (a small token budget per step keeps them queued): the planner turns a decode
worker into a prefill worker. Then short prompts with long answers pile sequences up on the one
decode worker left: it turns a prefill worker back. No request fails on the way.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from cluster.config import PlannerSettings
from tests.cluster_harness import TEST_ENGINE, cluster_config, ray_session, running_cluster, worker_leaks

pytestmark = pytest.mark.slow

KEY = "sk-user"
ADMIN = "sk-admin"
# 128 tokens per step: a 400-token prompt takes 4 steps, and the prompts behind it wait (queued).
ENGINE = TEST_ENGINE.model_copy(update={"max_num_batched_tokens": 128})
# Latency SLOs far out of reach: the p90s are observed (asserted below) but only the load
# thresholds decide here, so the test does not depend on how fast this host is.
PLANNER = dict(enabled=True, interval_s=0.5, lease_ttl_s=5.0, hysteresis=2, cooldown_s=4.0, global_cooldown_s=2.0,
               max_switches_per_window=10, window_s=120.0, prefill_queue_tokens_high=300, decode_seqs_high=5,
               kv_usage_high=0.95, slo_ttft_ms=600_000, slo_itl_ms=600_000, latency_window_s=10.0, migrate=True,
               drain_timeout_s=30.0)
WORDS = "river stone cloud paper light garden window music orange forest letter bridge".split()


@pytest.fixture(scope="module")
def session(redis_server, tmp_path_factory):
    trace = tmp_path_factory.mktemp("planner") / "trace.jsonl"
    with ray_session():
        config = cluster_config("planner", engine=ENGINE, prefill=1, decode=2, api_keys=(KEY,),
                                admin_api_keys=(ADMIN,), kv_transport="grpc",
                                planner=PlannerSettings(**PLANNER, trace_file=str(trace)))
        with running_cluster(config, redis_server.url) as s:
            s.trace = trace
            yield s


def admin(session, path: str) -> dict:
    resp = httpx.get(f"{session.url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def roles(session) -> dict[str, tuple[str, str]]:
    return {w["id"]: (w["role"], w["phase"]) for w in admin(session, "/workers")["data"]}


def wait_for(session, what: str, ok: Callable[[dict[str, tuple[str, str]]], bool], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = roles(session)
        if ok(now):
            return now
        if time.monotonic() > deadline:
            status = admin(session, "/planner")
            raise AssertionError(f"{what} within {timeout:.0f}s: roles {now}, planner note {status['note']!r}, "
                                 f"streaks {status['streaks']}")
        time.sleep(0.2)


class Traffic:
    """`threads` clients sending `body(client, n)` back to back until the block ends; errors kept."""

    def __init__(self, session, threads: int, body: Callable[[int], dict]) -> None:
        self.session, self.body = session, body
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.session.url}/v1", api_key=KEY, max_retries=0, timeout=180)
        model = client.models.list().data[0].id
        n = 0
        while not self.stop.is_set():
            try:
                out = client.completions.create(model=model, temperature=0, **self.body(i * 1000 + n))
                assert out.choices[0].finish_reason == "length", out
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
                self.errors.append(repr(exc))
            n += 1

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def long_prompt(n: int) -> dict:
    rng = random.Random(n)  # distinct from the first token on: no prefix-cache hits
    return {"prompt": f"{n} " + " ".join(rng.choice(WORDS) for _ in range(400)), "max_tokens": 2}


def long_answer(n: int) -> dict:
    return {"prompt": f"Story {n}:", "max_tokens": 48, "extra_body": {"ignore_eos": True}}


def test_the_planner_follows_a_phase_shifting_workload(session):
    start = roles(session)
    assert sorted(r for r, _ in start.values()) == ["decode", "decode", "prefill"]
    decoders = {wid for wid, (r, _) in start.items() if r == "decode"}
    deadline = time.monotonic() + 15
    while not admin(session, "/planner")["leader"]:  # one planner, so it takes the lease at once
        assert time.monotonic() < deadline, "the planner never took the lease"
        time.sleep(0.1)

    with Traffic(session, 4, long_prompt) as heavy_prompts:
        after = wait_for(session, "a decode worker becomes a prefill worker",
                         lambda now: any(now[w] == ("prefill", "ready") for w in decoders), timeout=60)
    assert sorted(after.values()) == [("decode", "ready"), ("prefill", "ready"), ("prefill", "ready")]
    assert heavy_prompts.errors == [] and heavy_prompts.done > 0

    with Traffic(session, 10, long_answer) as long_answers:
        wait_for(session, "a prefill worker becomes a decode worker again",
                        lambda now: sorted(now.values()) == [("decode", "ready"), ("decode", "ready"),
                                                             ("prefill", "ready")], timeout=60)
    assert long_answers.errors == [] and long_answers.done > 0

    status = admin(session, "/planner")
    made = [(d["from_role"], d["to_role"]) for d in status["decisions"] if d["started"]]
    assert made == [("decode", "prefill"), ("prefill", "decode")], status["decisions"]
    assert status["last_observation"]["ttft_p90_ms"] is not None  # the router's windows reach it
    metrics = httpx.get(f"{session.url}/metrics", timeout=30).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values['pdserve:planner_decisions_total{to="prefill"}'] == 1
    assert values['pdserve:planner_decisions_total{to="decode"}'] == 1
    assert values["pdserve:planner_leader"] == 1
    assert values['pdserve:num_workers{role="decode"}'] == 2 and values['pdserve:num_workers{role="prefill"}'] == 1
    assert sum(v for k, v in values.items()
               if k.startswith('pdserve:role_switches_total{from="decode",to="prefill"')) == 1
    assert worker_leaks(session) == []
    record = os.environ.get("PDSERVE_RECORD_PLANNER_TRACE")  # refresh tests/unit/data/planner_trace.jsonl
    if record:
        shutil.copy(session.trace, Path(record))
