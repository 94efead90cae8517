"""The Worker gRPC service: Prefill, Decode, Generate, Abort, Health, Stats on one engine.

Prefill side (role prefill or mixed):
  1. schedule the prompt with `hold_kv` (chunked like any prompt), sample the first token;
  2. pin the blocks under a lease and return the first token plus a KVHandle;
  3. unpin when the decode worker Releases, when the lease expires, or on Abort.
Decode side (role decode or mixed):
  1. allocate blocks for the prompt, reusing this worker's prefix cache;
  2. pull the blocks it lacks from the prefill worker (NIXL READ or gRPC stream), Release there;
  3. continue from the first token and stream the tokens after it.
A failed pull ends the request (`fail`) or recomputes the prompt here (`recompute`, counted).
A failed engine (e.g. a dead expert-parallel rank) ends every request with UNAVAILABLE and a
message naming the cause, so the router retries those that have not streamed anything yet.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from cluster.rpc import MOVED_KV_KEY, MOVED_METADATA
from cluster.worker.convert import output_to_chunk, params_from_pb
from cluster.worker.engine_loop import EngineDead, RequestAborted, RequestMoved
from cluster.worker.roles import Kind, SwitchRefused
from engine.sampling_params import SamplingParams
from pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from cluster.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

ROLE_PB = {"prefill": worker_pb2.ROLE_PREFILL, "decode": worker_pb2.ROLE_DECODE, "mixed": worker_pb2.ROLE_MIXED}
ROLE_NAMES = {v: k for k, v in ROLE_PB.items()}
_REFUSED_CODE = {
    "stale_epoch": grpc.StatusCode.FAILED_PRECONDITION,
    "busy": grpc.StatusCode.ABORTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, rt: "WorkerRuntime") -> None:
        self.rt = rt

    # ----- checks -----
    async def _admit(self, ctx: grpc.aio.ServicerContext, epoch: int, kind: Kind) -> None:
        """Admit a request of `kind` (counted until `self.rt.admission.leave(kind)`) or abort the RPC."""
        refusal = self.rt.admission.enter(kind, epoch)
        if refusal is not None:
            code = grpc.StatusCode.UNAVAILABLE if refusal.code == "unavailable" else grpc.StatusCode.FAILED_PRECONDITION
            await ctx.abort(code, refusal.message)

    async def _params(self, ctx: grpc.aio.ServicerContext, req: worker_pb2.GenerateRequest) -> SamplingParams:
        try:
            return params_from_pb(req.params)
        except ValueError as exc:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    # ----- prefill -----
    async def Prefill(self, request: worker_pb2.GenerateRequest, context) -> worker_pb2.PrefillResponse:
        await self._admit(context, request.epoch, "prefill")
        with self.rt.admission.holding("prefill", request.request_id):
            return await self._prefill(request, context)

    async def _prefill(self, request: worker_pb2.GenerateRequest, context) -> worker_pb2.PrefillResponse:
        params = await self._params(context, request)
        rt, rid = self.rt, request.request_id
        t0 = time.monotonic()
        last = None
        try:
            async for out in rt.loop.generate(rid, list(request.prompt_token_ids), params, hold_kv=True,
                                              multi_modal_data=_media(request)):
                last = out
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineDead as exc:
            await self._unavailable(context, exc)
        except RequestAborted as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        first = output_to_chunk(last, params.logprobs)
        resp = worker_pb2.PrefillResponse(first=first, prefill_seconds=time.monotonic() - t0)
        if not last.kv_held:
            return resp  # the first token already ended the request; nothing to move
        try:
            block_ids, (mm_spans, mrope_delta) = await rt.loop.call(
                lambda e: (e.held_kv_blocks(rid), e.held_kv_multimodal(rid)))
        except ValueError:  # aborted between the last step and now
            await context.abort(grpc.StatusCode.ABORTED, f"request {rid} was aborted during prefill")
        except EngineDead as exc:
            await self._unavailable(context, exc)
        except asyncio.CancelledError:  # the caller went away before the blocks got a lease
            rt.loop.abort_nowait(rid)
            raise
        if len(last.prompt_token_ids) != len(request.prompt_token_ids):
            # Single placeholders the engine grew: the decode side would get another prompt than the KV's.
            rt.loop.abort_nowait(rid)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the prompt's image placeholder runs are not the images' lengths ({len(last.prompt_token_ids)} "
                                f"tokens computed, {len(request.prompt_token_ids)} sent)")
        expiry = rt.leases.add(rid, list(block_ids), len(request.prompt_token_ids), time.time())
        resp.handle.CopyFrom(rt.kv_handle(rid, block_ids, len(request.prompt_token_ids), expiry, mm_spans, mrope_delta))
        rt.publish_prefix(list(request.prompt_token_ids), mm_spans)
        return resp

    # ----- decode -----
    async def Decode(self, request: worker_pb2.DecodeRequest, context) -> AsyncIterator[worker_pb2.TokenChunk]:
        await self._admit(context, request.request.epoch, "decode")
        with self.rt.admission.holding("decode", request.request.request_id):
            # aclosing: a client that goes away must run _decode's cleanup now, not at garbage collection.
            async with contextlib.aclosing(self._decode(request, context)) as chunks:
                try:
                    async for chunk in chunks:
                        yield chunk
                except EngineDead as exc:
                    await self._unavailable(context, exc)
                except RequestMoved as exc:  # a role switch handed it away: the router resumes it
                    await self._moved(context, exc)
                except RequestAborted as exc:  # an Abort for it came while someone still listened
                    await context.abort(grpc.StatusCode.ABORTED, str(exc))

    async def _decode(self, request: worker_pb2.DecodeRequest, context) -> AsyncIterator[worker_pb2.TokenChunk]:
        g = request.request
        params = await self._params(context, g)
        rt, rid, handle = self.rt, g.request_id, request.handle
        if g.resume_token_ids:  # moved or failed over mid-stream: with its KV (a handle) or recomputed
            moved = self._migrated(context, request, params) if request.HasField("handle") else \
                self._resume(context, g, params)
            async with contextlib.aclosing(moved) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if handle.layout_hash != rt.layout.hash():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV layout mismatch: the prefill worker's hash is {handle.layout_hash}, this worker "
                                f"({rt.layout.describe()}) has {rt.layout.hash()}")
        prompt = list(g.prompt_token_ids)
        mm_spans, mrope_delta = _handle_multimodal(handle)
        try:
            kv_import, stream = await rt.loop.attach(
                rid, lambda e: e.add_prefilled_request(rid, prompt, request.first_token_id, params, mm_spans=mm_spans,
                                                       mrope_delta=mrope_delta))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except MemoryError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            await rt.receiver.fetch(handle, kv_import.block_ids, kv_import.num_cached_blocks)
        except Exception as exc:  # noqa: BLE001 - any transfer failure goes through the policy
            await rt.loop.abort(rid)  # frees the blocks allocated for the import (the stream never started)
            if rt.spec.kv_failure_policy == "recompute" and mm_spans and not g.media:
                logger.warning("KV pull for %s failed: %s; an image prompt cannot be recomputed here", rid, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc} (the prompt has images, "
                                    "which a decode worker does not receive, so it cannot recompute it)")
            if rt.spec.kv_failure_policy == "recompute":
                rt.kv_counters.recompute_total += 1
                logger.warning("KV pull for %s failed (%s); recomputing the prompt here", rid, exc)
                async for chunk in self._recompute(rid, prompt, request.first_token_id, params, _media(g)):
                    yield chunk
                return
            logger.warning("KV pull for %s failed: %s", rid, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}")
        except BaseException:
            rt.loop.abort_nowait(rid)
            raise
        started = False
        try:
            try:
                (first,) = await rt.loop.call(lambda e: e.finish_kv_import(rid))
            except ValueError:
                # Dropped while its KV arrived (aborted, or handed off by a migrating switch): its
                # stream already holds the reason, and raises it.
                started = True
                async for out in stream:
                    yield output_to_chunk(out, params.logprobs)
                return
            if first.finished:
                # The first token alone ended it here (the prefill side already streamed it).
                yield worker_pb2.TokenChunk(finish_reason=output_to_chunk(first, None).finish_reason,
                                            num_prompt_tokens=len(prompt))
                return
            started = True
            async for out in stream:
                yield output_to_chunk(out, params.logprobs)
        finally:
            await stream.aclose()  # a started stream aborts itself if it did not finish
            if not started:  # never iterated, so its own cleanup never ran: drop it from the loop
                rt.loop.abort_nowait(rid)

    async def _recompute(self, rid: str, prompt: list[int], first_token: int, params: SamplingParams,
                         media: dict | None) -> AsyncIterator[worker_pb2.TokenChunk]:
        # The client already has the first token: continue from prompt + first token.
        rest = replace(params, max_tokens=max(1, params.max_tokens - 1), min_tokens=max(0, params.min_tokens - 1))
        async for out in self.rt.loop.generate(rid, prompt + [first_token], rest, multi_modal_data=media):
            chunk = output_to_chunk(out, params.logprobs)
            chunk.num_prompt_tokens = len(prompt)
            yield chunk

    async def _migrated(self, context, request: worker_pb2.DecodeRequest,
                        params: SamplingParams) -> AsyncIterator[worker_pb2.TokenChunk]:
        """Continue a request moved here mid-generation with its KV: pull the blocks the handle
        names (prompt + generated - 1 tokens) from the worker it left, and decode on from exactly
        where it stopped. A handle that does not fit, or a failed pull, recomputes (counted)."""
        rt, g, handle = self.rt, request.request, request.handle
        rid, prompt, generated = g.request_id, list(g.prompt_token_ids), list(g.resume_token_ids)
        stream = None
        if handle.layout_hash == rt.layout.hash() and handle.num_tokens == len(prompt) + len(generated) - 1:
            try:
                mm_spans, mrope_delta = _handle_multimodal(handle)
                kv_import, stream = await rt.loop.attach(
                    rid, lambda e: e.add_migrated_request(rid, prompt, generated, params, mm_spans=mm_spans,
                                                          mrope_delta=mrope_delta))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except MemoryError as exc:  # no room for its KV now: recomputing queues it instead
                logger.warning("moved request %s: %s; recomputing it here", rid, exc)
            if stream is not None:
                try:
                    await rt.receiver.fetch(handle, kv_import.block_ids, kv_import.num_cached_blocks)
                except Exception as exc:  # noqa: BLE001 - any transfer failure: recompute instead
                    logger.warning("KV pull of moved request %s failed (%s); recomputing it here", rid, exc)
                    await rt.loop.abort(rid)
                    await stream.aclose()
                    stream = None
                except BaseException:
                    rt.loop.abort_nowait(rid)
                    raise
        else:
            logger.warning("moved request %s came with an unusable KV handle (%d tokens, layout %s); recomputing",
                           rid, handle.num_tokens, handle.layout_hash)
        if stream is None:
            rt.kv_counters.migration_recompute_total += 1
            async with contextlib.aclosing(self._resume(context, g, params)) as resumed:
                async for chunk in resumed:
                    yield chunk
            return
        rt.kv_counters.migrated_in_total += 1
        try:
            try:
                await rt.loop.call(lambda e: e.finish_migrated_import(rid))
            except ValueError:
                pass  # dropped while its KV arrived: the stream raises why
            async for out in stream:
                chunk = output_to_chunk(out, params.logprobs)
                chunk.num_prompt_tokens = len(prompt)
                yield chunk
        finally:
            await stream.aclose()

    async def _resume(self, context, g: worker_pb2.GenerateRequest,
                      params: SamplingParams) -> AsyncIterator[worker_pb2.TokenChunk]:
        """Continue a request another worker was streaming: recompute prompt + generated tokens here."""
        self.rt.kv_counters.resumed_total += 1
        prompt = list(g.prompt_token_ids)
        try:
            outs = self.rt.loop.generate(g.request_id, prompt, params, resume=list(g.resume_token_ids),
                                         multi_modal_data=_media(g))
            async with contextlib.aclosing(outs):
                async for out in outs:
                    chunk = output_to_chunk(out, params.logprobs)
                    chunk.num_prompt_tokens = len(prompt)
                    yield chunk
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # ----- colocated -----
    async def Generate(self, request: worker_pb2.GenerateRequest, context) -> AsyncIterator[worker_pb2.TokenChunk]:
        await self._admit(context, request.epoch, "generate")
        with self.rt.admission.holding("generate", request.request_id):
            params = await self._params(context, request)
            if request.resume_token_ids:
                self.rt.kv_counters.resumed_total += 1
            try:
                async for out in self.rt.loop.generate(request.request_id, list(request.prompt_token_ids), params,
                                                       resume=list(request.resume_token_ids),
                                                       multi_modal_data=_media(request)):
                    yield output_to_chunk(out, params.logprobs)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineDead as exc:
                await self._unavailable(context, exc)
            except RequestMoved as exc:
                await self._moved(context, exc)
            except RequestAborted as exc:
                await context.abort(grpc.StatusCode.ABORTED, str(exc))

    async def _moved(self, ctx: grpc.aio.ServicerContext, exc: RequestMoved) -> None:
        metadata = [MOVED_METADATA]
        if exc.kv is not None:  # the KV stays pinned here under a lease: the target pulls it
            metadata.append((MOVED_KV_KEY, exc.kv.SerializeToString()))
        await ctx.abort(grpc.StatusCode.UNAVAILABLE, str(exc), trailing_metadata=tuple(metadata))

    async def _unavailable(self, ctx: grpc.aio.ServicerContext, exc: EngineDead) -> None:
        await ctx.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.rt.worker_id}: {exc}")

    # ----- control -----
    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        found = await self.rt.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    async def Health(self, request, context) -> worker_pb2.HealthResponse:
        rt, m = self.rt, self.rt.roles
        ready = rt.loop.alive and m.ready
        if ready:
            message = "ready"
        elif m.phase == "failed":
            message = m.reason
        elif m.switching:
            message = f"switching from {m.role} to {m.target_role} ({m.phase})"
        elif m.phase == "stopping":
            message = "shutting down"
        else:
            message = "engine stopped"
        return worker_pb2.HealthResponse(
            ready=ready, role=ROLE_PB[m.role], epoch=m.epoch, worker_id=rt.worker_id, message=message, phase=m.phase,
            phase_since_unix=m.phase_since, target_role=ROLE_PB.get(m.target_role or "", 0), reason=m.reason,
            history=[worker_pb2.PhaseEvent(phase=e.phase, ts_unix=e.ts, role=ROLE_PB[e.role], epoch=e.epoch,
                                           target_role=ROLE_PB.get(e.target_role or "", 0), note=e.note)
                     for e in m.history],
            role_switches_total=m.switches_total, role_rollbacks_total=m.rollbacks_total)

    async def Stats(self, request, context) -> worker_pb2.StatsResponse:
        try:
            return await self.rt.stats()
        except EngineDead as exc:
            await self._unavailable(context, exc)
            raise  # unreachable: abort raises

    async def SetRole(self, request: worker_pb2.SetRoleRequest, context) -> worker_pb2.SetRoleResponse:
        m = self.rt.roles
        target = ROLE_NAMES.get(request.role)
        if target is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SetRole needs a role: prefill, decode or mixed")
        if request.drain_timeout_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"drain_timeout_s must not be negative, got {request.drain_timeout_s:g}")
        try:
            changed = await self.rt.switcher.request(target, request.expected_epoch, request.drain_timeout_s,
                                                     request.migrate, request.wait)
        except SwitchRefused as exc:
            await context.abort(_REFUSED_CODE[exc.code], str(exc))
            raise  # unreachable: abort raises
        if not changed:
            message = f"already {m.role} at epoch {m.epoch}"
        elif m.switching:
            message = f"switching from {m.role} to {m.target_role}; poll Health until phase is ready"
        elif m.phase == "ready" and m.role == target:
            message = f"now {m.role} at epoch {m.epoch}"
        else:
            message = f"switch to {target} failed: {m.reason}"
        return worker_pb2.SetRoleResponse(role=ROLE_PB[m.role], epoch=m.epoch, phase=m.phase, changed=changed,
                                          message=message)


def _media(g: worker_pb2.GenerateRequest) -> dict | None:
    """The request's images as the engine takes them (encoded bytes; decoded on the engine thread)."""
    if not g.media:
        return None
    bad = sorted({m.modality for m in g.media} - {"image"})
    if bad:
        raise ValueError(f"media of modality {bad} is not supported (only image)")
    return {"image": [m.data for m in g.media]}


def _handle_multimodal(handle: kv_pb2.KVHandle) -> tuple[list[tuple[int, int, int]], int | None]:
    """(mm_spans, mrope_delta) a KV handle carries for a vision prompt."""
    spans = [(s.offset, s.length, s.content_hash) for s in handle.mm_spans]
    return spans, handle.mrope_delta if handle.HasField("mrope_delta") else None
