"""pdserve bench: statistics, arrival schedules, JSONL loading, dispatch, and a run against a real
streaming HTTP server."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.bench.client import (
    EndpointConfig,
    RequestRecord,
    build_payload,
    error_message,
    join_url,
    parse_sse_line,
)
from cluster.bench.main import add_arguments, run
from cluster.bench.metrics import dist_ms, meets_slos, parse_slos, peak_concurrency, percentile, summarize, tpot_s
from cluster.bench.runner import run_schedule
from cluster.bench.workload import BenchRequest, arrival_offsets, load_jsonl, random_requests


def rec(index: int = 0, *, ttft: float = 0.1, e2e: float = 1.0, out: int = 10, itl: tuple[float, ...] = (),
        prompt: int = 5, start: float = 0.0, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=index, success=error is None, start_s=start, e2e_s=e2e,
                         ttft_s=None if error else ttft, itl_s=itl, output_tokens=0 if error else out,
                         prompt_tokens=prompt, usage_reported=True, error=error)


# ---------------------------------------------------------------- statistics


def test_percentiles_interpolate_linearly() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    d = dist_ms([0.010, 0.020, 0.030, 0.040])  # seconds in, ms out
    assert (d.count, d.mean, d.median) == (4, pytest.approx(25), pytest.approx(25))
    assert d.p90 == pytest.approx(37.0) and d.p99 == pytest.approx(39.7)
    assert dist_ms([]).mean is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_tpot_excludes_the_first_token() -> None:
    assert tpot_s(rec(ttft=0.1, e2e=1.1, out=11)) == pytest.approx(0.1)
    assert tpot_s(rec(out=1)) is None  # no second token, no TPOT
    assert tpot_s(rec(error="boom")) is None


def test_summary_on_known_records() -> None:
    records = [
        rec(0, ttft=0.1, e2e=0.5, out=5, itl=(0.1, 0.1, 0.1, 0.1), prompt=10, start=0.0),
        rec(1, ttft=0.2, e2e=0.6, out=3, itl=(0.2, 0.2), prompt=20, start=0.1),
        rec(2, ttft=0.3, e2e=0.3, out=1, prompt=30, start=0.2),
        rec(3, e2e=0.05, error="HTTP 500: boom", start=0.3),
        rec(4, e2e=0.05, error="HTTP 500: boom", start=1.5),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s.completed, s.failed) == (3, 2)
    assert s.errors == {"HTTP 500: boom": 2}
    assert (s.total_input_tokens, s.total_output_tokens) == (60, 9)  # failed requests do not count
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(4.5)
    assert s.total_token_throughput == pytest.approx(34.5)
    assert s.ttft_ms.mean == pytest.approx(200) and s.ttft_ms.median == pytest.approx(200)
    # TPOT only for outputs longer than one token: (0.5-0.1)/4 = 0.1 s and (0.6-0.2)/2 = 0.2 s.
    assert s.tpot_ms.count == 2 and s.tpot_ms.mean == pytest.approx(150)
    assert s.itl_ms.count == 6 and s.itl_ms.mean == pytest.approx(400 / 3)  # pooled gaps
    assert s.e2e_ms.mean == pytest.approx(1400 / 3)
    assert s.peak_concurrency == 4  # requests 0-3 overlap at t = 0.3
    assert s.goodput is None and s.good_requests is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = [
        rec(0, ttft=0.05, e2e=0.05 + 0.04 * 9, out=10),  # good: ttft 50 ms, tpot 40 ms
        rec(1, ttft=0.20, e2e=0.20 + 0.04 * 9, out=10),  # ttft too slow
        rec(2, ttft=0.05, e2e=0.05 + 0.06 * 9, out=10),  # tpot too slow
        rec(3, ttft=0.05, e2e=0.05, out=1),  # one token: TPOT counts as 0, as vLLM does
        rec(4, error="timed out"),
    ]
    slos = parse_slos(["ttft:100", "tpot:50"])
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    s = summarize(records, duration_s=4.0, slos_ms=slos)
    assert s.good_requests == 2 and s.goodput == pytest.approx(0.5)
    s = summarize(records, duration_s=4.0, slos_ms=parse_slos(["e2e:300"]))
    assert s.good_requests == 1  # only the single-token request ends within 300 ms


def test_parse_slos() -> None:
    assert parse_slos(["ttft:500", "TPOT:50", "e2el:3000"]) == {"ttft": 500.0, "tpot": 50.0, "e2e": 3000.0}
    assert parse_slos(None) == {}
    for bad in ("itl:5", "ttft", "ttft:abc", "ttft:-1"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slos([bad])


def test_peak_concurrency_ends_before_starts() -> None:
    back_to_back = [rec(0, start=0.0, e2e=1.0), rec(1, start=1.0, e2e=1.0)]
    assert peak_concurrency(back_to_back) == 1
    assert peak_concurrency([rec(i, start=0.0, e2e=1.0) for i in range(3)]) == 3


# ---------------------------------------------------------------- workload


def test_poisson_arrivals_have_the_requested_mean_rate() -> None:
    offsets = arrival_offsets(20_000, rate=10.0, kind="poisson", seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert arrival_offsets(100, 10.0, "poisson", seed=7) == offsets[:100]  # seeded
    assert arrival_offsets(100, 10.0, "poisson", seed=8) != offsets[:100]


def test_fixed_and_infinite_arrivals() -> None:
    assert arrival_offsets(5, rate=4.0, kind="fixed") == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert arrival_offsets(3, rate=float("inf")) == [0.0, 0.0, 0.0]
    assert arrival_offsets(0, rate=1.0) == []
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=1.0, kind="bursty")


def test_random_prompts_are_seeded_and_sized() -> None:
    reqs = random_requests(8, input_len=16, output_len=4, seed=3)
    assert [len(r.prompt.split()) for r in reqs] == [16] * 8
    assert all(r.prompt_len == 16 and r.output_len == 4 for r in reqs)
    assert len({r.prompt for r in reqs}) == 8  # distinct, so prefix caching cannot help
    assert [r.prompt for r in random_requests(8, 16, 4, seed=3)] == [r.prompt for r in reqs]
    varied = random_requests(200, input_len=100, output_len=10, seed=0, range_ratio=0.5)
    assert all(50 <= r.prompt_len <= 150 and 5 <= r.output_len <= 15 for r in varied)
    assert len({r.prompt_len for r in varied}) > 10


class _WordTokenizer:
    """A whitespace tokenizer: enough of the transformers interface for random token prompts."""

    all_special_ids = [0]
    vocab = ["<s>"] + [f"w{i}" for i in range(1, 50)]

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [self.vocab.index(w) for w in text.split()]


def test_random_token_prompts_with_a_tokenizer() -> None:
    reqs = random_requests(4, input_len=12, output_len=3, seed=1, tokenizer=_WordTokenizer())
    for r in reqs:
        assert r.prompt_len == 12 and "<s>" not in r.prompt  # special tokens are never sampled


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": "bye"}\n')
    reqs = load_jsonl(path, default_output_len=3)
    assert [(r.index, r.prompt, r.prompt_len, r.output_len) for r in reqs] == [
        (0, "hello there", 2, 7), (1, "bye", 1, 3)]
    assert load_jsonl(path)[1].output_len is None
    assert len(load_jsonl(path, num=1)) == 1


@pytest.mark.parametrize("line, message", [
    ("not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "no prompt key"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "x", "output_len": 0}', '"output_len" must be a positive integer'),
    ('{"prompt": "x", "output_len": "5"}', '"output_len" must be a positive integer'),
])
def test_load_jsonl_rejects_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:2" in str(info.value)  # the line number is named


def test_load_jsonl_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_jsonl(path)


# ---------------------------------------------------------------- client helpers


def test_url_payload_and_sse_helpers() -> None:
    assert join_url("http://h:8000/", "/v1/completions") == "http://h:8000/v1/completions"
    assert join_url("http://h:8000/v1", "/v1/chat/completions") == "http://h:8000/v1/chat/completions"
    req = BenchRequest(0, "hi", 1, 5)
    body = build_payload(EndpointConfig(url="u", model="m", chat=False, temperature=0.0), req)
    assert body == {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": 5, "ignore_eos": True, "min_tokens": 5, "temperature": 0.0}
    chat = build_payload(EndpointConfig(url="u", model="m", chat=True, ignore_eos=False,
                                        extra_body={"top_p": 0.5}), BenchRequest(0, "hi", 1, None))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["top_p"] == 0.5
    assert "max_tokens" not in chat and "ignore_eos" not in chat
    assert parse_sse_line(": keep-alive") is None and parse_sse_line("") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert error_message('{"error": {"message": "nope", "code": 400}}') == "nope"
    assert error_message('{"detail": "Not Found"}') == "Not Found"
    assert error_message("plain text") == "plain text"


# ---------------------------------------------------------------- dispatch


def _fake_send(duration: float, log: dict[str, Any]):
    async def send(req: BenchRequest, bench_start: float) -> RequestRecord:
        start = time.perf_counter()
        log["in_flight"] += 1
        log["peak"] = max(log["peak"], log["in_flight"])
        log["starts"][req.index] = start - bench_start
        try:
            await asyncio.sleep(duration)
        finally:
            log["in_flight"] -= 1
        return RequestRecord(req.index, True, start - bench_start, duration, duration, (), 1, 1)

    return send


def _log() -> dict[str, Any]:
    return {"in_flight": 0, "peak": 0, "starts": {}}


def test_concurrency_cap_is_respected() -> None:
    reqs = [BenchRequest(i, "p", 1, 1) for i in range(12)]
    log = _log()
    done: list[int] = []
    result = asyncio.run(run_schedule(reqs, [0.0] * 12, _fake_send(0.02, log), max_concurrency=3,
                                      on_done=lambda r: done.append(r.index)))
    assert log["peak"] == 3
    assert len(result.records) == 12 and sorted(done) == list(range(12)) and not result.interrupted
    assert result.duration_s >= 4 * 0.02  # 12 requests, 3 at a time


def test_schedule_is_followed_with_rate_and_cap() -> None:
    reqs = [BenchRequest(i, "p", 1, 1) for i in range(6)]
    offsets = arrival_offsets(6, rate=50.0, kind="fixed")  # every 20 ms
    log = _log()
    asyncio.run(run_schedule(reqs, offsets, _fake_send(0.005, log), max_concurrency=2))
    for i, offset in enumerate(offsets):
        assert offset - 0.002 <= log["starts"][i] <= offset + 0.5  # never early
    assert log["peak"] <= 2


def test_interrupt_returns_partial_results() -> None:
    reqs = [BenchRequest(i, "p", 1, 1) for i in range(5)]
    offsets = [0.0, 0.0, 10.0, 10.0, 10.0]  # three never start before the interrupt

    async def main():
        task = asyncio.create_task(run_schedule(reqs, offsets, _fake_send(5.0, _log())))
        await asyncio.sleep(0.1)
        task.cancel()
        return await task

    result = asyncio.run(main())
    assert result.interrupted and result.duration_s < 2.0
    assert [(r.index, r.success, r.error) for r in result.records] == [(0, False, "interrupted"),
                                                                       (1, False, "interrupted")]


# ---------------------------------------------------------------- end to end
# This small FastAPI server stands in for "any OpenAI-compatible server" (pdserve, vLLM, SGLang):
# it streams SSE in OpenAI's exact format, usage chunk included, with known sleeps. A run against
# pdserve's own router is to be added once the router exists.

TTFT_SLEEP = 0.05
ITL_SLEEP = 0.02


def _make_app(received: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}]}

    async def serve(request: Request, chat: bool):
        body = await request.json()
        received.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL" in prompt:
            error = {"message": "injected failure", "type": "server_error", "param": None, "code": 500}
            return JSONResponse({"error": error}, status_code=500)
        n = body.get("max_tokens", 4)
        usage = (body.get("stream_options") or {}).get("include_usage") and "NOUSAGE" not in prompt
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            data = {"id": rid, "object": obj, "created": created, "model": body["model"], "choices": [choice]}
            if usage:
                data["usage"] = None  # OpenAI sends usage: null on every chunk but the last
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk(None, None, role=True)  # role-only chunk: not a token
            await asyncio.sleep(2.0 if "SLOW" in prompt else TTFT_SLEEP)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL_SLEEP)
                yield chunk(f" tok{i}", None)
            yield chunk(None if chat else "", "length")
            if usage:
                ptoks = len(prompt.split())
                data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": body["model"], "choices": [],
                        "usage": {"prompt_tokens": ptoks, "completion_tokens": n, "total_tokens": ptoks + n}}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on so nothing can take it
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(_make_app(received), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", received
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _check_timings(req: dict[str, Any], n_tokens: int) -> None:
    """Measured times against the server's sleeps. Only lower bounds: a loaded machine can delay
    and bunch up chunks (so one gap may be short), but never make the sleeps shorter in total."""
    assert req["ttft_ms"] >= TTFT_SLEEP * 1000 - 1
    assert len(req["itl_ms"]) == n_tokens - 1
    assert sum(req["itl_ms"]) >= (n_tokens - 1) * ITL_SLEEP * 1000 - 1
    assert req["tpot_ms"] >= ITL_SLEEP * 1000 - 1
    assert req["e2e_ms"] >= req["ttft_ms"] + sum(req["itl_ms"]) - 1


def test_end_to_end_completions(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, received = server
    received.clear()
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "one two three", "output_len": 5}, {"prompt": "please FAIL now"},
             {"prompt": "four five", "output_len": 3}, {"prompt": "NOUSAGE here", "output_len": 4},
             {"prompt": "FAIL again"}, {"prompt": "SLOW prompt"}, {"prompt": "last one"}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out_json, out_png = tmp_path / "res" / "result.json", tmp_path / "plot.png"
    rc = _bench(["--base-url", base + "/v1", "--dataset", "jsonl", "--dataset-path", str(data),
                 "--num-prompts", "7", "--output-len", "2", "--ignore-eos", "--request-timeout", "0.5",
                 "--goodput", "ttft:5000", "e2e:10000", "--result-json", str(out_json),
                 "--plot", str(out_png), "--disable-tqdm", "--api-key", "sk-secret"])
    assert rc == 0
    console = capsys.readouterr().out
    assert "Serving Benchmark Result" in console and "Mean TTFT (ms)" in console
    assert "injected failure" in console

    doc = json.loads(out_json.read_text())
    assert "sk-secret" not in out_json.read_text()
    assert doc["config"]["model"] == "fake-model"  # from GET /v1/models
    summary = doc["summary"]
    assert (summary["completed"], summary["failed"]) == (4, 3)
    assert summary["errors"] == {"HTTP 500: injected failure": 2, "timed out after 0.5 s": 1}
    assert summary["total_output_tokens"] == 5 + 3 + 4 + 2
    assert summary["good_requests"] == 4
    assert summary["goodput"] == pytest.approx(4 / summary["duration_s"])
    by_index = {r["index"]: r for r in doc["requests"]}
    assert len(by_index) == 7
    for index, n_tokens in ((0, 5), (2, 3), (3, 4), (6, 2)):
        assert by_index[index]["success"] and by_index[index]["output_tokens"] == n_tokens
        _check_timings(by_index[index], n_tokens)
    assert by_index[3]["usage_reported"] is False  # counted from chunks
    assert by_index[0]["usage_reported"] is True and by_index[0]["prompt_tokens"] == 3
    assert not by_index[1]["success"] and by_index[1]["error"] == "HTTP 500: injected failure"
    assert not by_index[5]["success"] and 450 <= by_index[5]["e2e_ms"] < 1900

    sent = {b["prompt"]: b for b in received}
    assert sent["one two three"]["max_tokens"] == 5 and sent["one two three"]["min_tokens"] == 5
    assert sent["last one"]["max_tokens"] == 2 and sent["last one"]["ignore_eos"] is True
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in received)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_chat_with_concurrency_cap(server, tmp_path: Path, capsys) -> None:
    base, received = server
    received.clear()
    out_json = tmp_path / "chat.json"
    rc = _bench(["--base-url", base, "--endpoint", "/v1/chat/completions", "--model", "fake-model",
                 "--dataset", "random", "--input-len", "8", "--output-len", "3", "--num-prompts", "6",
                 "--max-concurrency", "2", "--request-rate", "inf", "--goodput", "ttft:1",
                 "--result-json", str(out_json), "--plot", str(tmp_path / "chat.png"), "--disable-tqdm"])
    assert rc == 0
    doc = json.loads(out_json.read_text())
    summary = doc["summary"]
    assert (summary["completed"], summary["failed"]) == (6, 0)
    assert summary["peak_concurrency"] <= 2
    assert summary["total_output_tokens"] == 18 and summary["total_input_tokens"] == 48
    assert summary["good_requests"] == 0 and summary["goodput"] == 0.0  # nobody meets a 1 ms TTFT
    # Three waves of two: each takes at least TTFT_SLEEP + 2 * ITL_SLEEP.
    assert summary["duration_s"] >= 3 * (TTFT_SLEEP + 2 * ITL_SLEEP) - 0.003
    for req in doc["requests"]:
        _check_timings(req, 3)  # the role-only first chunk did not count as the first token
    assert all(len(b["messages"][0]["content"].split()) == 8 and b["ignore_eos"] is True for b in received)
    assert (tmp_path / "chat.png").stat().st_size > 0


def test_unreachable_server_and_bad_arguments(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _bench(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1", "--disable-tqdm"]) == 1
    assert "cannot list models" in capsys.readouterr().err
    assert _bench(["--base-url", "http://x", "--goodput", "latency:5"]) == 2
    assert _bench(["--base-url", "http://x", "--dataset", "jsonl"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert _bench(["--base-url", "http://x", "--dataset", "jsonl", "--dataset-path", str(bad)]) == 1
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
