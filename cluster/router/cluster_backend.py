"""ClusterBackend: runs a request across workers over gRPC (the disaggregated request lifecycle).

1. pick a prefill worker by prefix overlap (Redis prefix index) and queued prefill tokens;
2. `Prefill` there: the first token comes back with a KVHandle; it is streamed at once;
3. pick a decode worker by free KV blocks and running sequences; `Decode` there pulls the KV
   and streams the rest;
4. on early exit (client gone) abort on both workers; a worker that is unreachable is marked
   down and the step is retried once elsewhere before the client sees an error.
With only `mixed` workers, one `Generate` call does it all (retried once elsewhere likewise, if
the worker failed before streaming anything).

Role switches: a worker whose epoch moved on, or that is mid-switch, refuses with
FAILED_PRECONDITION; the router re-reads the registry and re-routes, up to `max_reroutes` times
per step (however many switches happen meanwhile) with a short back-off (a worker refuses from the
moment it fences, a few ms before the registry shows it), and waits up to `reroute_wait_s` for a
worker of the needed role when every candidate is switching. The client sees none of it.

Resume (Dynamo's "request migration"): a decode or mixed worker that fails mid-stream (it died,
or its engine did: UNAVAILABLE) is replaced by another one that recomputes prompt + the tokens
already streamed and continues (`resume_token_ids`; counted by the worker as
`requests_resumed_total`): the client sees one stream, with no token lost or repeated, the same
greedy continuation and, for seeded sampling, the same continuation (the seeded sampler's
position is the number of tokens generated). At most `max_resumes` times per request.
A stream that a migrating role switch handed back (UNAVAILABLE with the `pdserve-moved` trailing
metadata, cluster/rpc.py) is resumed the same way, but it is no failure: the worker is not marked
down, and such moves are bounded by `max_reroutes` instead. When it left its KV pinned (a handle
in that metadata), the next decode or mixed worker pulls it instead of recomputing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from cluster.config import EngineArgs
from cluster.errors import InvalidRequestError, NoWorkerError, PdserveError, WorkerError
from cluster.router.admin import ClusterAdmin
from cluster.router.backend import GenerationRequest, ModelInfo
from cluster.router.policy import pick_decode, pick_prefill
from cluster.router.pool import WorkerConn, WorkerPool
from cluster.rpc import moved_kv, was_moved
from cluster.state.prefix import prefix_block_hashes
from cluster.state.store import Store
from cluster.sampling_pb import params_to_pb
from pdserve.v1 import kv_pb2, worker_pb2

logger = logging.getLogger(__name__)


def model_info(engine: EngineArgs, served_model_name: str) -> ModelInfo:
    """What the router needs of the model (tokenizer, context length) without loading weights, in a
    process that has the engine (`pdserve serve`: a GGUF is converted on the way, the tokenizer is
    transformers'). A router process without torch uses cluster/router/model.py instead."""
    from engine.config import DEFAULT_MAX_MODEL_LEN_CAP
    from engine.loader import load_config, load_tokenizer, resolve_model_path
    from pdcommon.model_files import flatten_text_config
    from pdcommon.vision import VisionInfo

    path = resolve_model_path(engine.model)
    hf = flatten_text_config(load_config(path))
    max_len = engine.max_model_len or min(int(hf.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN_CAP)),
                                          DEFAULT_MAX_MODEL_LEN_CAP)
    tok = load_tokenizer(path)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ModelInfo(served_model_name, max_len, tok, eos_ids, int(time.time()),
                     VisionInfo.from_folder(path, engine.mm_processor_kwargs))


def config_mismatches(workers, block_size: int, max_model_len: int) -> list[str]:
    """Workers whose published KV block size or context length differ from this router's (a
    router started with another config than the workers'): what is wrong, one line each. Pure."""
    out = []
    for w in workers:
        if w.block_size and w.block_size != block_size:
            out.append(f"worker {w.worker_id} uses KV blocks of {w.block_size} tokens, this router {block_size} "
                       "(the prefix index then misses): give the router the workers' engine.block_size")
        if w.max_model_len and w.max_model_len != max_model_len:
            out.append(f"worker {w.worker_id} serves max_model_len {w.max_model_len}, this router checks "
                       f"{max_model_len}: give the router the workers' engine.max_model_len")
    return out


def _moved_handle(exc: grpc.aio.AioRpcError, num_tokens: int) -> kv_pb2.KVHandle | None:
    """The KV handle a moved stream left, if it covers exactly the tokens the client has (prompt +
    generated - 1: the last token's KV is computed by the next worker); else None (recompute)."""
    raw = moved_kv(exc) if was_moved(exc) else None
    if raw is None:
        return None
    handle = kv_pb2.KVHandle.FromString(raw)
    if handle.num_tokens != num_tokens:
        logger.warning("moved request %s left KV for %d tokens, the client has %d; recomputing it", handle.request_id,
                       handle.num_tokens, num_tokens)
        return None
    return handle


def _error(exc: grpc.aio.AioRpcError, conn: WorkerConn) -> PdserveError:
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NoWorkerError(f"worker {conn.info.worker_id} is out of capacity: {detail}", code="overloaded")
    return WorkerError(f"worker {conn.info.worker_id} failed: {code.name}: {detail}")


class ClusterBackend:
    def __init__(self, store: Store, model: ModelInfo, block_size: int = 16, prefill_timeout_s: float = 600.0,
                 max_reroutes: int = 16, reroute_wait_s: float = 10.0, max_resumes: int = 2) -> None:
        self.store = store
        self.model = model
        self.block_size = block_size
        self.prefill_timeout_s = prefill_timeout_s
        self.max_reroutes = max_reroutes
        self.reroute_wait_s = reroute_wait_s
        self.pool = WorkerPool(store)
        self.admin = ClusterAdmin(self.pool)
        self.max_resumes = max_resumes
        self.reroutes_total = 0
        self.resumes_total = 0
        self._bg: set[asyncio.Task] = set()
        self._warned: set[str] = set()

    # ----- Backend protocol -----
    async def generate(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        await self.pool.refresh()
        if not self._servable():
            await self.pool.refresh(force=True)  # the view may predate a worker that just joined
        if self.pool.ready("prefill") and self.pool.ready("decode"):
            stream = self._disaggregated(request)
        elif self.pool.ready("mixed"):
            stream = self._colocated(request)
        else:
            raise NoWorkerError(self._missing())
        async for chunk in stream:
            yield chunk

    async def readiness(self) -> tuple[bool, str]:
        try:
            await self.pool.refresh(force=True)  # /ready reports the registry as it is now
        except Exception as exc:  # noqa: BLE001 - Redis down: not ready, say why
            return False, f"registry unavailable: {exc}"
        self._warn_mismatches()
        if self._servable():
            return True, "ready"
        return False, self._missing()

    def _warn_mismatches(self) -> None:
        """Log, once each, workers started with another block size or context length."""
        for line in config_mismatches([c.info for c in self.pool.conns.values()], self.block_size,
                                      self.model.max_model_len):
            if line not in self._warned:
                self._warned.add(line)
                logger.warning("%s", line)

    async def worker_stats(self) -> list[worker_pb2.StatsResponse]:
        await self.pool.refresh()
        conns = list(self.pool.conns.values())
        results = await asyncio.gather(*(c.stub.Stats(worker_pb2.StatsRequest(), timeout=2.0) for c in conns),
                                       return_exceptions=True)
        return [r for r in results if isinstance(r, worker_pb2.StatsResponse)]

    def counters(self) -> dict[str, float]:
        """The router's own counts, for /metrics."""
        return {"reroutes_total": self.reroutes_total, "resumes_total": self.resumes_total}

    async def close(self) -> None:
        for t in list(self._bg):
            t.cancel()
        await self.pool.close()
        await self.store.close()

    # ----- paths -----
    def _servable(self) -> bool:
        return bool((self.pool.ready("prefill") and self.pool.ready("decode")) or self.pool.ready("mixed"))

    def _missing(self) -> str:
        have = {r: len(self.pool.ready(r)) for r in ("prefill", "decode", "mixed")}
        return ("no ready worker for this request: need a prefill and a decode worker, or a mixed one "
                f"(ready: {have['prefill']} prefill, {have['decode']} decode, {have['mixed']} mixed)")

    def _generate_pb(self, request: GenerationRequest, epoch: int, resume: list[int] | None = None,
                     media: bool = True) -> worker_pb2.GenerateRequest:
        """`media` False: without the images (a Decode that pulls the prompt's KV never needs them;
        a resumed or recomputed one does)."""
        return worker_pb2.GenerateRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            params=params_to_pb(request.params), epoch=epoch, resume_token_ids=resume or [],
            media=[worker_pb2.MediaItem(modality="image", data=img.data) for img in request.images] if media else [])

    async def _may_resume(self, exc: grpc.aio.AioRpcError, conn: WorkerConn, resumes: Counter[str],
                          tried: set[str]) -> bool:
        """Resume elsewhere from the tokens the client already has when a worker failed mid-stream
        (it died, or its engine did: at most max_resumes times per request, and the worker is
        marked down), or when a role switch handed the stream back (`moved`: the worker is healthy
        and already fenced, so it is neither marked down nor excluded; at most max_reroutes times)."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        moved = was_moved(exc)
        kind, bound = ("moved", self.max_reroutes) if moved else ("failed", self.max_resumes)
        if resumes[kind] >= bound:
            return False
        resumes[kind] += 1
        self.resumes_total += 1
        if moved:
            logger.info("worker %s handed a stream back (%s); resuming it elsewhere", conn.info.worker_id,
                        exc.details())
            await self.pool.refresh(force=True)  # the registry already shows the worker fenced
            return True
        tried.add(conn.info.worker_id)
        self.pool.mark_down(conn.info.worker_id)
        logger.warning("worker %s failed mid-stream (%s); resuming the request elsewhere (%d/%d)",
                       conn.info.worker_id, exc.details(), resumes[kind], self.max_resumes)
        return True

    async def _candidates(self, role: str, exclude: set[str]) -> list[WorkerConn]:
        """Ready workers of `role` not in `exclude`. With none, the view is re-read at once (it may
        predate a switch that just ended) and, while some worker is mid-switch, again for up to
        `reroute_wait_s`: a switch never turns into a 503 for the requests that meet it."""
        conns = [c for c in self.pool.ready(role) if c.info.worker_id not in exclude]
        if conns:
            return conns
        deadline = time.monotonic() + self.reroute_wait_s
        while True:
            await self.pool.refresh(force=True)
            conns = [c for c in self.pool.ready(role) if c.info.worker_id not in exclude]
            if conns or time.monotonic() >= deadline or not self.pool.switching():
                return conns
            await asyncio.sleep(0.05)

    async def _rerouted(self, conn: WorkerConn, exc: grpc.aio.AioRpcError, tried: set[str], attempts: int) -> bool:
        """Whether to try the step again after `exc` (and on which view): UNAVAILABLE excludes the
        worker (one retry); FAILED_PRECONDITION (stale epoch, wrong role, mid-switch) re-reads the
        registry and re-routes up to max_reroutes times."""
        code = exc.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION and attempts < self.max_reroutes:
            if "layout" in (exc.details() or ""):
                return False  # a KV layout mismatch does not go away by re-routing to the same pair
            self.reroutes_total += 1
            logger.info("worker %s refused (%s); re-routing", conn.info.worker_id, exc.details())
            # A worker refuses from the moment it fences, a few ms before the registry says so:
            # back off (5 ms, doubling, at most 0.2 s) so the re-reads see it rather than the
            # re-routes running out on the same worker.
            await asyncio.sleep(min(0.2, 0.005 * 2 ** (attempts - 1)))
            await self.pool.refresh(force=True)
            return True
        if code == grpc.StatusCode.UNAVAILABLE and conn.info.worker_id not in tried:
            tried.add(conn.info.worker_id)
            await self._after_failure(conn, exc)
            return True
        return False

    async def _pick_prefill(self, request: GenerationRequest, role: str, exclude: set[str]) -> WorkerConn:
        conns = await self._candidates(role, exclude)
        if not conns:
            raise NoWorkerError(self._missing())
        hashes = prefix_block_hashes(list(request.prompt_token_ids), self.block_size, request.mm_spans)
        overlap = await self.store.prefix_overlap(hashes) if hashes and len(conns) > 1 else {}
        prompt_blocks = -(-len(request.prompt_token_ids) // self.block_size)
        view = pick_prefill([c.view() for c in conns], overlap, prompt_blocks, self.block_size)
        return self.pool.conns[view.worker_id]

    async def _pick_decode(self, request: GenerationRequest, exclude: set[str], prefill: WorkerConn) -> WorkerConn:
        ready = await self._candidates("decode", exclude)
        # KV only moves between identical layouts (the handshake enforces it; skip the doomed pairs).
        conns = [c for c in ready if c.info.layout_hash == prefill.info.layout_hash]
        if not conns:
            if ready:
                raise NoWorkerError(f"no ready decode worker shares the KV layout {prefill.info.layout_hash} of "
                                    f"prefill worker {prefill.info.worker_id}", code="kv_layout_mismatch")
            raise NoWorkerError(self._missing())
        need = -(-(len(request.prompt_token_ids) + request.params.max_tokens) // self.block_size)
        return self.pool.conns[pick_decode([c.view() for c in conns], need).worker_id]

    async def _prefill(self, request: GenerationRequest) -> tuple[WorkerConn, worker_pb2.PrefillResponse]:
        tried: set[str] = set()
        attempts = 0
        while True:
            conn = await self._pick_prefill(request, "prefill", tried)
            conn.inflight += 1
            try:
                resp = await conn.stub.Prefill(self._generate_pb(request, conn.info.epoch),
                                               timeout=self.prefill_timeout_s)
                return conn, resp
            except grpc.aio.AioRpcError as exc:
                attempts += 1
                if await self._rerouted(conn, exc, tried, attempts):
                    continue
                raise _error(exc, conn) from exc
            finally:
                conn.inflight -= 1

    async def _disaggregated(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        rid = request.request_id
        p_conn, resp = await self._prefill(request)
        yield resp.first
        if resp.first.finish_reason or not resp.HasField("handle"):
            return
        tried: set[str] = set()
        finished = False
        attempts = 0
        resumes: Counter[str] = Counter()
        generated = list(resp.first.token_ids)  # what the client has: a resume continues from it
        resume = False
        left_kv: kv_pb2.KVHandle | None = None  # the KV a moved stream left pinned on its worker
        while True:
            try:
                d_conn = await self._pick_decode(request, tried, p_conn)
            except NoWorkerError:
                self._abort_later(p_conn, rid)  # nobody will pull: unpin now rather than at lease expiry
                raise
            d_conn.inflight += 1
            if resume:  # pull the KV the moved stream left behind, or (none: the worker died) recompute it
                decode = worker_pb2.DecodeRequest(request=self._generate_pb(request, d_conn.info.epoch, generated))
                if left_kv is not None:
                    decode.handle.CopyFrom(left_kv)
            else:
                decode = worker_pb2.DecodeRequest(request=self._generate_pb(request, d_conn.info.epoch, media=False),
                                                  handle=resp.handle, first_token_id=resp.first.token_ids[0])
            call = d_conn.stub.Decode(decode)
            got_any = retry = moved = False
            try:
                async for chunk in call:
                    got_any = True
                    finished = bool(chunk.finish_reason)
                    generated.extend(chunk.token_ids)
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                # Nothing streamed yet and P still holds the lease: another decode worker can pull
                # (not so for a moved stream: the worker it left had pulled the KV already).
                attempts += 1
                moved = was_moved(exc)
                if moved:
                    left_kv = _moved_handle(exc, len(request.prompt_token_ids) + len(generated) - 1)
                elif got_any:  # the stream went on past the tokens that KV covers
                    left_kv = None
                retry = not got_any and not moved and await self._rerouted(d_conn, exc, tried, attempts)
                if not retry and await self._may_resume(exc, d_conn, resumes, tried):
                    if not resume:
                        # Nobody pulls P's KV now: unpin it at once, and before the resumed stream
                        # starts anywhere (P may have turned decode and be picked for it; a late
                        # Abort of this request id would end the resumed stream there).
                        await self._abort_now(p_conn, rid)
                    retry = resume = True
                if not retry:
                    raise _error(exc, d_conn) from exc
            finally:
                d_conn.inflight -= 1
                if not finished:
                    call.cancel()
                    if retry and moved and left_kv is not None:
                        pass  # its KV waits there for the next worker's pull (a lease frees it otherwise)
                    elif retry and moved:  # a healthy worker: the Abort lands before the resume is sent
                        await self._abort_now(d_conn, rid)
                    else:
                        self._abort_later(d_conn, rid)
                    if not retry:
                        self._abort_later(p_conn, rid)

    async def _colocated(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        tried: set[str] = set()
        attempts = 0
        resumes: Counter[str] = Counter()
        generated: list[int] = []
        left_kv: kv_pb2.KVHandle | None = None  # the KV a moved stream left pinned on its worker
        while True:
            conn = await self._pick_prefill(request, "mixed", tried)
            conn.inflight += 1
            if left_kv is not None:  # moved with its KV: the next mixed worker pulls it and goes on
                call = conn.stub.Decode(worker_pb2.DecodeRequest(
                    request=self._generate_pb(request, conn.info.epoch, generated), handle=left_kv))
            else:
                call = conn.stub.Generate(self._generate_pb(request, conn.info.epoch, generated))
            finished = got_any = retry = moved = False
            try:
                async for chunk in call:
                    got_any = True
                    finished = bool(chunk.finish_reason)
                    generated.extend(chunk.token_ids)
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                # Nothing streamed yet (e.g. the worker's engine failed while it was queued): another
                # mixed worker can run it from the start, as _prefill does. Mid-stream: resume there.
                attempts += 1
                moved = was_moved(exc)
                if moved:
                    left_kv = _moved_handle(exc, len(request.prompt_token_ids) + len(generated) - 1) \
                        if generated else None
                elif got_any:  # the stream went on past the tokens that KV covers
                    left_kv = None
                retry = not got_any and not moved and await self._rerouted(conn, exc, tried, attempts)
                if not retry and (generated or moved) and await self._may_resume(exc, conn, resumes, tried):
                    retry = True
                if not retry:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_down(conn.info.worker_id)
                    raise _error(exc, conn) from exc
            finally:
                conn.inflight -= 1
                if not finished:
                    call.cancel()
                    if retry and moved and left_kv is not None:
                        pass  # its KV waits there for the next worker's pull (a lease frees it otherwise)
                    elif retry and moved:  # a healthy worker: the Abort lands before the resume is sent
                        await self._abort_now(conn, request.request_id)
                    else:
                        self._abort_later(conn, request.request_id)

    # ----- helpers -----
    async def _after_failure(self, conn: WorkerConn, exc: grpc.aio.AioRpcError) -> None:
        logger.warning("worker %s: %s: %s; retrying elsewhere", conn.info.worker_id, exc.code().name, exc.details())
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_down(conn.info.worker_id)
        else:  # stale epoch or role: re-read the registry before the retry
            await self.pool.refresh(force=True)

    async def _abort_now(self, conn: WorkerConn, request_id: str) -> None:
        try:
            await conn.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            logger.info("abort of %s on %s failed: %s", request_id, conn.info.worker_id, exc.code().name)

    def _abort_later(self, conn: WorkerConn, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort_now(conn, request_id))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
