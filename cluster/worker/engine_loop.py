"""EngineLoop: one LLMEngine stepped on its own thread, driven from asyncio.

The engine is not thread-safe, so every touch of it (adding, aborting, KV seam calls, stats) runs
on the loop thread between steps as a command; callers `await` the result. Outputs go to one
asyncio queue per request. With nothing to do the thread blocks on its command queue (no
polling), so an idle worker uses no CPU.

A step that raises (e.g. `EPGroupError`: a rank of an expert-parallel group died) ends the loop:
`on_dead` is told, every in-flight request and queued command fails at once with `EngineDead`
naming the cause, later calls are refused, and the engine is closed (stopping its ranks), as it
is on a clean stop.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, coalesce
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()


class EngineDead(RuntimeError):
    """The engine thread stopped (shutdown or a failed step); in-flight requests fail with this."""


class RequestMoved(RuntimeError):
    """The request was handed to another worker (`EngineLoop.hand_off`); its stream here ends.
    `kv`: what the target needs to pull the request's KV from here (None: it recomputes)."""

    def __init__(self, reason: str, kv: Any = None) -> None:
        super().__init__(reason)
        self.kv = kv


@dataclass(frozen=True)
class HeldKV:
    """A handed-off request's KV pinned here for the target to pull: its blocks (in token order)
    and how many tokens they hold (prompt + generated - 1)."""

    block_ids: tuple[int, ...]
    num_tokens: int
    mm_spans: tuple[tuple[int, int, int], ...] = ()  # a vision prompt's images (offset, length, hash)
    mrope_delta: int | None = None


class RequestAborted(RuntimeError):
    """The request was aborted (`EngineLoop.abort`) while its stream was still being read. An
    exception of its own, not CancelledError: a gRPC handler that let CancelledError out would end
    without a status, leaving a caller that still listens waiting forever."""


class _Fail:
    """A command that ends the loop as if a step had raised `exc` (a failure seen from outside)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Sink:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass


class EngineLoop:
    """`call(fn)` runs fn(engine) on the engine thread; `generate(...)` streams a request's outputs."""

    def __init__(self, engine: LLMEngine, name: str = "engine-loop",
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._cmds: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # touched only on the engine thread
        self._dead: BaseException | None = None
        # Guards `_dead` against enqueueing: a command put after the dying thread drained the
        # queue would never be answered.
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # what killed the loop (None: running or stopped cleanly)
        self.on_dead = on_dead  # called on the engine thread when a failure ends the loop
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----- asyncio side -----
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread; its exception (e.g. ValueError) is raised here."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put((fn, loop, fut))
        return await fut

    def call_nowait(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Fire and forget (for cleanup paths that cannot await, e.g. a cancelled generator); a
        no-op once the loop is dead (it already dropped every request)."""
        try:
            self._put((fn, None, None))
        except EngineDead:
            pass

    def _put(self, cmd: Any) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDead(f"engine loop is not running: {self._dead}")
            self._cmds.put(cmd)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *, hold_kv: bool = False,
        resume: list[int] | tuple[int, ...] = (), multi_modal_data: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and stream its snapshots; closing the iterator early aborts it.
        `multi_modal_data` as LLMEngine.add_request takes it (the image bytes are decoded and
        preprocessed on the engine thread, off the event loop)."""
        sink = _Sink(asyncio.get_running_loop())

        def add(engine: LLMEngine) -> None:
            if request_id in self._sinks:
                raise ValueError(f"request id {request_id!r} is already in flight")
            engine.add_request(request_id, prompt, params, hold_kv=hold_kv, resume=resume,
                               multi_modal_data=multi_modal_data)
            self._sinks[request_id] = sink

        await self._call_or_abort(add, request_id)
        async for out in self._drain(request_id, sink):
            yield out

    async def attach(self, request_id: str, register: Callable[[LLMEngine], T]) -> tuple[T, AsyncIterator[RequestOutput]]:
        """Run `register(engine)` (which puts `request_id` into the engine) and stream its outputs."""
        sink = _Sink(asyncio.get_running_loop())

        def run(engine: LLMEngine) -> T:
            if request_id in self._sinks:
                raise ValueError(f"request id {request_id!r} is already in flight")
            result = register(engine)
            self._sinks[request_id] = sink
            return result

        result = await self._call_or_abort(run, request_id)
        return result, self._drain(request_id, sink)

    async def _call_or_abort(self, fn: Callable[[LLMEngine], T], request_id: str) -> T:
        # Cancelled while the command is queued: it still runs, so undo it or nobody reads it.
        try:
            return await self.call(fn)
        except asyncio.CancelledError:
            self.abort_nowait(request_id)
            raise

    async def _drain(self, request_id: str, sink: _Sink) -> AsyncIterator[RequestOutput]:
        finished = False
        held: RequestOutput | BaseException | None = None
        try:
            while True:
                item = held if held is not None else await sink.queue.get()
                held = None
                # Snapshots that piled up while the consumer was busy go out as one (their token
                # deltas joined); nothing waits for more: the first token is never delayed.
                while not isinstance(item, BaseException) and not item.finished and not sink.queue.empty():
                    nxt = sink.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        held = nxt
                        break
                    item = coalesce(item, nxt)
                if isinstance(item, BaseException):
                    finished = True  # the engine side already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort in any state; True when the request was known."""
        return await self.call(lambda engine: self._abort(engine, request_id))

    def abort_nowait(self, request_id: str) -> None:
        """Abort without waiting (cleanup paths of cancelled tasks)."""
        self.call_nowait(lambda engine: self._abort(engine, request_id))

    async def hand_off(self, request_id: str, reason: str,
                       with_kv: Callable[[HeldKV], Any] | None = None) -> bool:
        """End the request's stream here with RequestMoved(reason): it continues on another
        worker (a role switch moving its sequences). True when the request was known.

        With `with_kv`, a request between decode steps keeps its KV pinned (HOLDING_KV) and
        `with_kv(held)`, called on the event loop, returns what RequestMoved carries for the target
        to pull it with (a KV handle under a lease); if it raises, the KV is let go. Any other
        request is dropped, and the target recomputes it."""
        def take(engine: LLMEngine) -> tuple[bool, HeldKV | None, _Sink | None]:
            if with_kv is not None:
                try:
                    n = engine.hold_running_kv(request_id)
                    held = HeldKV(engine.held_kv_blocks(request_id), n, *engine.held_kv_multimodal(request_id))
                    return True, held, self._sinks.pop(request_id, None)
                except ValueError:
                    pass
            known = request_id in engine.children or request_id in engine.requests
            engine.abort(request_id)
            return known, None, self._sinks.pop(request_id, None)

        known, held, sink = await self.call(take)
        kv = None
        if held is not None:
            try:
                kv = with_kv(held)
            except Exception:  # noqa: BLE001 - the target recomputes instead
                logger.exception("pinning the KV of %s for its move failed; it will be recomputed", request_id)
                self.abort_nowait(request_id)
        if sink is not None:
            sink.put(RequestMoved(reason, kv))
        return known

    def _abort(self, engine: LLMEngine, request_id: str, exc: BaseException | None = None) -> bool:
        known = request_id in engine.children or request_id in engine.requests
        engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink.put(exc if exc is not None else RequestAborted(f"request {request_id} was aborted"))
        return known

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread (it closes the engine); False if it is still running after `timeout`."""
        self._cmds.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def fail(self, exc: BaseException) -> None:
        """End the loop with `exc`, as if a step had raised it (after the step in progress)."""
        self._cmds.put(_Fail(exc))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ----- engine thread -----
    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._run_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.steps += 1
                    self._dispatch(outputs)
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail every waiter, whatever killed it
            logger.exception("engine loop died")
            self.error = exc
            dead: BaseException = EngineDead(f"engine failed: {exc}")
        else:
            dead = EngineDead("engine loop stopped")
        with self._lock:
            self._dead = dead
        # Told before the waiters fail, so a worker already reports itself failed when its
        # requests see the error.
        if self.error is not None and self.on_dead is not None:
            try:
                self.on_dead(self.error)
            except Exception:  # noqa: BLE001 - failing the waiters and closing the engine must still happen
                logger.exception("engine failure callback failed")
        self._fail_all(dead)
        try:
            self.engine.close()  # stops the ranks of an expert-parallel group
        except Exception:  # noqa: BLE001 - nothing more to do for a dying engine
            logger.exception("closing the engine failed")

    def _run_commands(self, block: bool) -> bool:
        while True:
            try:
                cmd = self._cmds.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Fail):
                raise cmd.exc
            fn, loop, fut = cmd
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            if fut is None:
                if error is not None:
                    logger.warning("engine command failed: %s", error)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, fut, result, error)
            except RuntimeError:
                pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            sink.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        for sink in self._sinks.values():
            sink.put(exc)
        self._sinks.clear()
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not _STOP and not isinstance(cmd, _Fail) and cmd[2] is not None:
                try:
                    cmd[1].call_soon_threadsafe(_resolve, cmd[2], None, exc)
                except RuntimeError:
                    pass


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
