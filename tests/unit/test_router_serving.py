"""Fan-out plumbing without a model: interleaving, errors, cancellation reaching every backend
generator, disconnect watching, stop reasons and the SSE chunk shape."""
from __future__ import annotations

import asyncio
import json

import pytest

from cluster.errors import NoWorkerError, WorkerError
from cluster.router.backend import GenerationRequest
from cluster.router.openai import ChatChunkChoice, ChatCompletionChunk, DeltaMessage
from cluster.router.serving import (ChoiceState, ClientGone, Prompt, Sequence, merged, sse, sse_error,
                                    unless_disconnected)
from engine.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2

STOP, LENGTH = worker_pb2.FINISH_REASON_STOP, worker_pb2.FINISH_REASON_LENGTH


def chunk(text: str, finish: int = 0) -> worker_pb2.TokenChunk:
    return worker_pb2.TokenChunk(token_ids=[1], text=text, finish_reason=finish)


class ScriptedBackend:
    """generate() plays a script per request id: chunks, "sleep", an exception, or "hang"."""

    def __init__(self, scripts: dict[str, list]) -> None:
        self.scripts = scripts
        self.closed: list[str] = []

    async def generate(self, request: GenerationRequest):
        try:
            for step in self.scripts[request.request_id]:
                if step == "hang":
                    await asyncio.Event().wait()
                elif step == "sleep":
                    await asyncio.sleep(0.01)
                elif isinstance(step, BaseException):
                    raise step
                else:
                    yield step
        finally:
            self.closed.append(request.request_id)


def seqs(n: int) -> list[Sequence]:
    return [Sequence(i, Prompt((1,), "p"), GenerationRequest(f"r-{i}", (1,), SamplingParams())) for i in range(n)]


async def drain(it) -> list[tuple[int, str]]:
    return [(i, c.text) async for i, c in it]


def test_merged_interleaves_every_sequence():
    backend = ScriptedBackend({"r-0": [chunk("a"), "sleep", "sleep", chunk("b", LENGTH)],
                               "r-1": ["sleep", chunk("x"), chunk("y", STOP)]})
    out = asyncio.run(drain(merged(backend, seqs(2))))
    assert [t for i, t in out if i == 0] == ["a", "b"] and [t for i, t in out if i == 1] == ["x", "y"]
    assert out.index((1, "x")) < out.index((0, "b"))  # interleaved, not one after the other
    assert sorted(backend.closed) == ["r-0", "r-1"]


def test_an_error_in_one_sequence_raises_and_closes_the_others():
    backend = ScriptedBackend({"r-0": [chunk("a"), "hang"], "r-1": ["sleep", NoWorkerError("no decode worker")]})
    with pytest.raises(NoWorkerError):
        asyncio.run(drain(merged(backend, seqs(2))))
    assert sorted(backend.closed) == ["r-0", "r-1"]


def test_closing_early_closes_every_backend_generator():
    backend = ScriptedBackend({"r-0": [chunk("a"), "hang"], "r-1": ["hang"]})

    async def run():
        it = merged(backend, seqs(2))
        assert await anext(it) == (0, chunk("a"))
        await it.aclose()

    asyncio.run(run())
    assert sorted(backend.closed) == ["r-0", "r-1"]


@pytest.mark.parametrize("script,match", [
    ([chunk("a")], "without a finish reason"),
    ([chunk("a"), asyncio.CancelledError()], "was aborted"),
])
def test_backend_misbehaviour_becomes_a_worker_error(script, match):
    with pytest.raises(WorkerError, match=match):
        asyncio.run(drain(merged(ScriptedBackend({"r-0": script}), seqs(1))))


class FakeRequest:
    def __init__(self, disconnect_after: float | None) -> None:
        self.after = disconnect_after

    async def receive(self):
        if self.after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.after)
        return {"type": "http.disconnect"}


def test_unless_disconnected_cancels_work_when_the_client_leaves():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(ClientGone):
        asyncio.run(unless_disconnected(FakeRequest(0.01), work()))
    assert cancelled == [True]

    async def quick():
        return 42

    assert asyncio.run(unless_disconnected(FakeRequest(None), quick())) == 42


@pytest.mark.parametrize("raw,finish,expected", [
    ("", STOP, None), ("###", STOP, "###"), ("7", STOP, 7), ("2", STOP, None), ("9", LENGTH, None),
])
def test_stop_reason(raw, finish, expected):
    c = ChoiceState(0, Prompt((1,), None), SamplingParams(stop=("###",), stop_token_ids=(7,)), eos_token_ids=(2,))
    c.add(worker_pb2.TokenChunk(token_ids=[1], finish_reason=finish, stop_reason=raw))
    assert c.stop_reason == expected


def test_sse_chunks_carry_only_what_they_set():
    head = dict(id="chatcmpl-1", object="chat.completion.chunk", created=1, model="m")
    event = sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content="hi"),
                                                                     logprobs=None, finish_reason=None)]))
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: "):])
    assert body == {**head, "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None,
                                         "finish_reason": None}]}
    err = json.loads(sse_error(WorkerError("boom"))[len("data: "):])
    assert err == {"error": {"message": "boom", "type": "internal_server_error", "param": None, "code": "worker_error"}}
    assert "secret" not in sse_error(RuntimeError("secret detail"))
