"""EngineLoop: the engine on its own thread, driven from asyncio (what every worker runs)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cluster.worker.engine_loop import EngineDead, EngineLoop
from engine import SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40)), [5] * 17]


@pytest.fixture
def loop_of(tiny_checkpoint, make_engine):
    loops = []

    def make(**kwargs):
        loop = EngineLoop(make_engine(tiny_checkpoint("llama"), **kwargs))
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop()


async def _collect(loop: EngineLoop, rid: str, prompt, params) -> list[int]:
    last = None
    async for out in loop.generate(rid, prompt, params):
        last = out
    return list(last.outputs[0].token_ids)


def test_concurrent_requests_match_the_plain_engine(loop_of, tiny_checkpoint, make_engine):
    from tests.conftest import run_to_completion

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = run_to_completion(make_engine(tiny_checkpoint("llama")), PROMPTS, params)
    loop = loop_of()

    async def main():
        return await asyncio.gather(*(_collect(loop, f"r{i}", p, params) for i, p in enumerate(PROMPTS)))

    assert asyncio.run(main()) == expected
    assert asyncio.run(_leaks(loop)) == []


async def _leaks(loop: EngineLoop) -> list[str]:
    return await loop.call(lambda e: e.leaks())


def test_closing_the_stream_early_aborts_and_frees_blocks(loop_of):
    loop = loop_of()

    async def main():
        stream = loop.generate("r", PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):  # the abort is queued as a command: give it a step
            if not await _leaks(loop):
                return []
            await asyncio.sleep(0.02)
        return await _leaks(loop)

    assert asyncio.run(main()) == []


def test_cancelled_consumer_aborts(loop_of):
    loop = loop_of()

    async def main():
        task = asyncio.create_task(_collect(loop, "r", PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not await _leaks(loop):
                break
            await asyncio.sleep(0.02)
        return await _leaks(loop)

    assert asyncio.run(main()) == []


def test_errors_reach_the_caller_and_change_nothing(loop_of):
    loop = loop_of()

    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await _collect(loop, "bad", [], SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(loop, "bad2", [10_000], SamplingParams())
        # A duplicate id in flight is refused, the first request is unaffected. The engine thread
        # is held on a gate while both adds are queued, so they run back to back, before any
        # step could finish the first request (however fast the machine).
        gate = threading.Event()
        loop.call_nowait(lambda engine: gate.wait(30))
        first = asyncio.create_task(_collect(loop, "dup", PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True)))
        second = asyncio.create_task(_collect(loop, "dup", PROMPTS[1], SamplingParams()))
        await asyncio.sleep(0)  # both tasks run up to their queued command
        gate.set()
        with pytest.raises(ValueError, match="already in flight"):
            await second
        assert len(await first) == 30
        assert await loop.abort("nope") is False
        return await _leaks(loop)

    assert asyncio.run(main()) == []


def test_idle_loop_does_not_spin(loop_of):
    loop = loop_of()
    before = loop.steps
    t0 = time.process_time()
    time.sleep(0.5)
    assert loop.steps == before
    # The engine thread blocks on its queue: the whole process (engine and torch threads
    # included, not just this sleeping thread) uses almost no CPU meanwhile.
    assert time.process_time() - t0 < 0.1


def test_stopped_loop_fails_callers_clearly(loop_of):
    loop = loop_of()
    loop.stop()

    async def main():
        with pytest.raises(EngineDead):
            await loop.call(lambda e: e.stats())

    asyncio.run(main())


def test_a_slow_consumer_gets_the_piled_up_tokens_in_one_message(loop_of):
    """Snapshots queued while the consumer is busy are coalesced: the stream carries every token
    once and in order, in fewer messages; the first snapshot is not held back."""
    loop = loop_of()
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def main():
        stream = loop.generate("slow", PROMPTS[2], params)
        # Usually one token; more when the engine outran this task to the first read (the
        # snapshots already queued then go out together: nothing waited for them).
        first = await stream.__anext__()
        assert len(first.outputs[0].new_token_ids) >= 1
        # Busy until the engine has finished the request: everything else is queued by then.
        while await loop.call(lambda e: e.has_unfinished_requests()):
            await asyncio.sleep(0.01)
        rest = [out async for out in stream]
        return first, rest

    first, rest = asyncio.run(main())
    msgs = [first, *rest]
    assert len(rest) <= 1 and msgs[-1].finished  # all that piled up came as one message
    deltas = [t for m in msgs for t in m.outputs[0].new_token_ids]
    assert deltas == list(msgs[-1].outputs[0].token_ids) and len(deltas) == 20
    assert "".join(m.outputs[0].new_text for m in msgs) == msgs[-1].outputs[0].text
