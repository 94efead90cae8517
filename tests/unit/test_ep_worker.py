"""Expert-parallel workers without a cluster: config and CLI, per-expert metrics, the engine loop
when a step fails, the rank watchdog's process check, and the router's retry on a mixed worker
that fails before streaming anything."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import grpc
import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig, EngineArgs, WorkerGroup, WorkerSpec
from engine import SamplingParams
from pdserve.v1 import worker_pb2


# ----- config -----
def test_expert_parallel_size_is_validated_and_reserves_a_cpu_per_rank():
    with pytest.raises(ValidationError):
        EngineArgs(expert_parallel_size=0)
    spec = WorkerSpec(role="prefill", redis_url="redis://x", num_threads=2, engine=EngineArgs(expert_parallel_size=4))
    assert spec.num_cpus == 5  # rank 0's threads + one per other rank
    assert spec.engine.engine_kwargs()["expert_parallel_size"] == 4


def test_cluster_wide_ep_shards_every_worker():
    c = ClusterConfig(engine=EngineArgs(expert_parallel_size=2), prefill=2, decode=1)
    specs = c.worker_specs("redis://x")
    assert [(s.role, s.engine.expert_parallel_size) for s in specs] == [("prefill", 2), ("prefill", 2), ("decode", 2)]
    assert sum(s.num_cpus for s in specs) == 6
    mixed = ClusterConfig(engine=EngineArgs(expert_parallel_size=2), mixed=2, prefill=0, decode=0)
    assert [s.engine.expert_parallel_size for s in mixed.worker_specs("redis://x")] == [2, 2]


def test_per_worker_ep_sizes_from_a_worker_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {expert_parallel_size: 1}\n"
                    "workers:\n  - {role: mixed, expert_parallel_size: 2}\n  - {role: mixed, count: 2}\n")
    c = ClusterConfig.from_yaml(path)
    assert (c.mixed, c.prefill, c.decode) == (3, 0, 0)
    assert [s.engine.expert_parallel_size for s in c.worker_specs("redis://x")] == [2, 1, 1]
    assert ClusterConfig.model_validate(c.model_dump()) == c  # survives the harness/CLI round trip
    with pytest.raises(ValidationError, match="contradicts"):
        ClusterConfig(workers=(WorkerGroup(role="mixed"),), mixed=2)
    pd = ClusterConfig(workers=(WorkerGroup(role="prefill", expert_parallel_size=2), WorkerGroup(role="decode")))
    assert [(s.role, s.engine.expert_parallel_size) for s in pd.worker_specs("redis://x")] == [("prefill", 2), ("decode", 1)]


def test_serve_flag_sets_the_engine_ep_size():
    from cluster.cli import _serve_config, build_parser

    args = build_parser().parse_args(["serve", "--expert-parallel-size", "2", "--mixed", "1"])
    assert _serve_config(args).engine.expert_parallel_size == 2
    args = build_parser().parse_args(["serve"])
    assert _serve_config(args).engine.expert_parallel_size == 1
    args = build_parser().parse_args(["serve", "--expert-parallel-size", "2", "--num-redundant-experts", "1",
                                      "--eplb-interval", "64", "--ep-dispatch", "alltoall"])
    kwargs = _serve_config(args).engine.engine_kwargs()  # what the worker hands LLMEngine.from_args
    assert (kwargs["num_redundant_experts"], kwargs["eplb_interval"], kwargs["ep_dispatch"]) == (1, 64, "alltoall")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ep-dispatch", "broadcast"])


# ----- metrics -----
def test_expert_tokens_and_ep_size_on_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from cluster.metrics import WorkerStatsCollector
    from cluster.worker.stats import stats_response
    from engine.llm_engine import EngineStats

    s = EngineStats(*([0] * len(EngineStats.__dataclass_fields__)))
    collector = WorkerStatsCollector()
    collector.latest = [
        stats_response("p0", worker_pb2.ROLE_PREFILL, 1, s, expert_parallel_size=2, expert_load=[[3, 0, 5], [1, 7, 0]]),
        stats_response("d0", worker_pb2.ROLE_DECODE, 1, s),  # dense or older: no expert series
    ]
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert re.search(r"^# TYPE pdserve:expert_tokens(_total)? counter$", text, re.M)
    assert 'pdserve:expert_tokens_total{expert="2",layer="0",role="prefill",worker="p0"} 5.0' in text
    assert 'pdserve:expert_tokens_total{expert="1",layer="1",role="prefill",worker="p0"} 7.0' in text
    assert sum(ln.startswith("pdserve:expert_tokens_total") for ln in text.splitlines()) == 6
    assert 'pdserve:expert_parallel_size{role="prefill",worker="p0"} 2.0' in text
    assert 'pdserve:expert_parallel_size{role="decode",worker="d0"} 1.0' in text


# ----- engine loop -----
class _Boom(RuntimeError):
    pass


@pytest.fixture
def failing_loop(tiny_checkpoint):
    """An EngineLoop whose engine's third step raises; no leak check (a failed engine keeps its requests)."""
    from cluster.worker.engine_loop import EngineLoop
    from engine import LLMEngine

    engine = LLMEngine.from_args(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64, max_model_len=256)
    step, calls, closed, dead = engine.step, [], [], []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise _Boom("expert-parallel rank 1 (pid 4242) exited with code -9")
        return step()

    engine.step = flaky_step
    engine.close = lambda: closed.append(1)
    loop = EngineLoop(engine, on_dead=dead.append)
    yield loop, closed, dead
    loop.stop()


def test_a_failed_step_fails_every_request_at_once_and_closes_the_engine(failing_loop):
    from cluster.worker.engine_loop import EngineDead

    loop, closed, dead = failing_loop
    params = SamplingParams(max_tokens=50, ignore_eos=True, temperature=0.0)

    async def consume(rid: str, prompt: list[int]):
        async for _ in loop.generate(rid, prompt, params):
            pass

    async def main():
        results = await asyncio.wait_for(asyncio.gather(consume("a", [1, 2, 3]), consume("b", [4, 5]),
                                                        return_exceptions=True), 10)
        with pytest.raises(EngineDead, match="rank 1"):
            await loop.call(lambda e: e.stats())
        loop.abort_nowait("a")  # cleanup paths stay quiet on a dead loop
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDead) and "rank 1" in str(r) for r in results), results
    assert [type(e) for e in dead] == [_Boom]
    assert loop.stop()  # the thread closes the engine last, after failing the waiters
    assert closed == [1] and not loop.alive and isinstance(loop.error, _Boom)


def test_fail_ends_an_idle_loop(tiny_checkpoint):
    from cluster.worker.engine_loop import EngineDead, EngineLoop
    from engine import LLMEngine

    engine = LLMEngine.from_args(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64, max_model_len=256)
    dead: list[BaseException] = []
    loop = EngineLoop(engine, on_dead=dead.append)
    loop.fail(EngineDead("expert-parallel rank 1 (pid 7) is gone"))
    loop._thread.join(5)
    assert not loop.alive and "rank 1" in str(dead[0])

    async def later():
        with pytest.raises(EngineDead, match="rank 1"):
            await loop.call(lambda e: e.stats())

    asyncio.run(later())
    assert loop.stop()  # already stopped: returns at once


def test_pid_alive_treats_zombies_as_dead():
    from cluster.worker.runtime import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 5
        while pid_alive(child.pid) and time.monotonic() < deadline:  # a zombie until reaped below
            time.sleep(0.02)
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


# ----- router -----
class _Call:
    """A fake streaming gRPC call: yields `chunks`, then raises `error` if given."""

    def __init__(self, chunks: list[worker_pb2.TokenChunk], error: grpc.StatusCode | None = None,
                 trailing: tuple = (), details: str = "engine failed: expert-parallel rank 1 (pid 9) exited") -> None:
        self.chunks, self.error, self.cancelled = chunks, error, False
        self.trailing, self.details = trailing, details

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for c in self.chunks:
            yield c
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(*self.trailing),
                                       details=self.details)

    def cancel(self) -> None:
        self.cancelled = True


class _Stub:
    def __init__(self, call: _Call) -> None:
        self.call, self.aborted = call, []

    def Generate(self, request):
        self.requests = getattr(self, "requests", []) + [request]
        return self.call

    async def Abort(self, request, timeout=None):
        self.aborted.append(request.request_id)
        return worker_pb2.AbortResponse()


def _backend(calls: dict[str, _Call]):
    from cluster.router.cluster_backend import ClusterBackend
    from cluster.router.pool import WorkerConn, WorkerPool
    from cluster.state.store import WorkerInfo

    class _Store:
        async def prefix_overlap(self, hashes):
            return {}

    backend = ClusterBackend.__new__(ClusterBackend)
    backend.store, backend.block_size, backend._bg = _Store(), 16, set()
    backend.max_reroutes, backend.reroute_wait_s, backend.max_resumes = 16, 0.0, 2
    backend.reroutes_total = backend.resumes_total = 0
    backend.pool = WorkerPool(store=None)  # type: ignore[arg-type]
    for wid, call in calls.items():
        info = WorkerInfo(worker_id=wid, address=wid, role="mixed", epoch=1, model="m", layout_hash="h",
                          transport="grpc")
        stub = _Stub(call)
        backend.pool.conns[wid] = WorkerConn(info, None, stub, None)  # type: ignore[arg-type]
    return backend


def _request():
    from cluster.router.backend import GenerationRequest

    return GenerationRequest(request_id="r1", prompt_token_ids=(1, 2, 3), params=SamplingParams(max_tokens=2))


def test_mixed_request_that_failed_before_any_token_is_retried_on_another_worker():
    done = worker_pb2.TokenChunk(token_ids=[5], finish_reason=worker_pb2.FINISH_REASON_LENGTH)
    failing = _Call([], grpc.StatusCode.UNAVAILABLE)
    backend = _backend({"a-dead": failing, "b-ok": _Call([done])})

    async def main():
        return [c async for c in backend._colocated(_request())]

    assert asyncio.run(main()) == [done]
    assert backend.pool.conns["a-dead"].down_until > time.monotonic()  # marked down, not picked again
    assert failing.cancelled


def test_mixed_request_that_already_streamed_is_resumed_from_its_tokens():
    """A worker failing after streaming is not restarted elsewhere (the client has tokens): the
    other worker resumes from them; a second failure mid-stream resumes again, up to the bound."""
    from cluster.errors import WorkerError

    first = worker_pb2.TokenChunk(token_ids=[5])
    last = worker_pb2.TokenChunk(token_ids=[6], finish_reason=1)
    backend = _backend({"a-dead": _Call([first], grpc.StatusCode.UNAVAILABLE), "b-ok": _Call([last])})

    async def run(b):
        got = []
        async for c in b._colocated(_request()):
            got.append(c)
        return got

    assert asyncio.run(run(backend)) == [first, last]
    (resumed,) = backend.pool.conns["b-ok"].stub.requests
    assert list(resumed.resume_token_ids) == [5] and backend.resumes_total == 1

    # Every worker fails mid-stream: resumed max_resumes times, then the error reaches the caller.
    dying = {f"w{i}": _Call([worker_pb2.TokenChunk(token_ids=[10 + i])], grpc.StatusCode.UNAVAILABLE)
             for i in range(4)}
    backend = _backend(dying)
    got = []

    async def main():
        with pytest.raises(WorkerError, match="rank 1"):
            async for c in backend._colocated(_request()):
                got.append(c)

    asyncio.run(main())
    assert len(got) == 3 and backend.resumes_total == 2


def test_a_stream_handed_back_by_a_switch_is_resumed_without_marking_the_worker_down():
    """A migrating switch ends its streams with UNAVAILABLE + the moved metadata: the router resumes
    each elsewhere, the worker stays routable, and moves do not use up the failure budget."""
    from cluster.rpc import MOVED_METADATA

    moved = [_Call([worker_pb2.TokenChunk(token_ids=[10 + i])], grpc.StatusCode.UNAVAILABLE, (MOVED_METADATA,),
                   details="worker is switching from mixed to prefill: the request moves") for i in range(3)]
    last = worker_pb2.TokenChunk(token_ids=[20], finish_reason=worker_pb2.FINISH_REASON_LENGTH)
    backend = _backend({"a": moved[0]})
    stub = backend.pool.conns["a"].stub
    calls = iter([*moved, _Call([last])])

    def generate(request):  # the same (healthy) worker again: each Generate gets the next call
        stub.requests = getattr(stub, "requests", []) + [request]
        return next(calls)

    stub.Generate = generate

    async def refresh(force=False):
        pass

    backend.pool.refresh = refresh

    async def main():
        return [c async for c in backend._colocated(_request())]

    got = asyncio.run(main())
    assert [list(c.token_ids) for c in got] == [[10], [11], [12], [20]]  # three moves > max_resumes (2)
    assert [list(r.resume_token_ids) for r in stub.requests] == [[], [10], [10, 11], [10, 11, 12]]
    assert backend.pool.conns["a"].down_until == 0.0 and backend.resumes_total == 3


def test_a_worker_leaving_the_registry_keeps_its_channel_while_calls_are_in_flight():
    """Closing the channel would cancel the calls on it (the router then saw CancelledError, a 502,
    instead of the worker's UNAVAILABLE and a retry elsewhere)."""
    from cluster.router.pool import WorkerConn, WorkerPool
    from cluster.state.store import WorkerInfo

    class _Channel:
        closed = False

        async def close(self) -> None:
            self.closed = True

    class _Store:
        workers: list[WorkerInfo] = []

        async def list_workers(self) -> list[WorkerInfo]:
            return self.workers

    pool = WorkerPool(store=_Store())  # type: ignore[arg-type]
    info = WorkerInfo(worker_id="gone", address="a", role="prefill", epoch=1, model="m", layout_hash="h",
                      transport="grpc")
    busy, idle = _Channel(), _Channel()
    pool.conns["gone"] = WorkerConn(info, busy, None, None, inflight=1)  # type: ignore[arg-type]
    pool.conns["idle"] = WorkerConn(info, idle, None, None)  # type: ignore[arg-type]

    async def main():
        await pool.refresh(force=True)
        assert pool.conns == {} and idle.closed and not busy.closed
        pool._retired[0].inflight = 0  # the call ended
        await pool.refresh(force=True)
        assert busy.closed and pool._retired == []

    asyncio.run(main())
