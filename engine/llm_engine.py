"""LLMEngine: the streaming step API (add_request / step / abort) over scheduler and model runner.

A step is: schedule -> execute -> update computed tokens -> sample -> detokenize -> check stops.
The KV seam for disaggregation lives here too: a request added with `hold_kv=True` stops after
its first token and keeps its blocks pinned until `release_kv`; `add_prefilled_request` allocates
blocks on another engine, the caller writes the exported KV into them, and `finish_kv_import`
lets the request continue decoding from its first token. A running request moves the same way
(live migration): `hold_running_kv` pins it mid-generation, `add_migrated_request` and
`finish_migrated_import` take it in on the other engine.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.config import CacheConfig, DEFAULT_MAX_MODEL_LEN_CAP, EngineConfig, ModelConfig, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.layers.sampler import sample
from engine.loader import load_config, load_tokenizer, resolve_model_path
from engine.model_runner import ModelRunner
from engine.multimodal.items import MRopePositions, MultiModalItem
from engine.multimodal.processor import ImageProcessor, expand_placeholders
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from pdcommon.vision import geometry_options
from engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVImport:
    """Blocks allocated on the receiving engine; the first `num_cached_blocks` are already there."""

    block_ids: tuple[int, ...]
    num_cached_blocks: int


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_holding_kv: int
    num_waiting_for_kv: int
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int  # in blocks
    prefix_cache_hits: int  # in blocks
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class LLMEngine:
    def __init__(
        self, config: EngineConfig, tokenizer: Any | None = None, device: str = "cpu", runner: ModelRunner | None = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner if runner is not None else ModelRunner(config, device)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        cache = getattr(self.runner, "encoder_cache", None)
        self.scheduler = Scheduler(config.scheduler, self.block_manager,
                                   encoder_cached=cache.__contains__ if cache is not None else None)
        self.requests: dict[str, Request] = {}  # every unfinished request (children for n > 1)
        self.children: dict[str, list[str]] = {}  # parent id -> child ids
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._migrated_cached: dict[str, int] = {}  # migrated request -> blocks its import reused
        self.mm_processor_kwargs: dict[str, Any] = {}
        self._image_processor: ImageProcessor | None = None

    @classmethod
    def from_args(
        cls,
        model: str | None = None,
        *,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gb: float = 1.0,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        device: str = "cpu",
        load_tokenizer_: bool = True,
        expert_parallel_size: int = 1,
        num_redundant_experts: int = 0,
        eplb_interval: int = 0,
        ep_launcher: Any = None,
        ep_dispatch: str = "replicated",
        mm_processor_kwargs: Mapping[str, Any] | None = None,
        max_num_encoder_tokens: int | None = None,
    ) -> "LLMEngine":
        """Build from vLLM-style arguments; `model=None` serves the default model.

        `expert_parallel_size=N > 1` (MoE models) shards the routed experts over N processes:
        this one and N-1 children; call `close()` to stop them. `num_redundant_experts` extra
        expert slots per rank hold replicas of hot experts; `eplb_interval=S > 0` rebalances the
        placement from observed load every S steps (`runner.rebalance()` does it on demand).
        `ep_launcher` starts the other ranks (default: child processes; see engine.parallel.group);
        `ep_dispatch` is "replicated" or "alltoall" (see engine.parallel.expert.EPMoE).
        `mm_processor_kwargs`: options of a vision model's image processor (e.g. max_pixels), the
        same for every request (they are part of each image's content hash);
        `max_num_encoder_tokens`: image tokens the vision encoder may make per step (default: the
        token budget)."""
        if expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {expert_parallel_size}")
        path = resolve_model_path(model)
        hf = load_config(path)
        mc = ModelConfig.from_hf_config(str(path), hf, dtype, quantization)
        if max_model_len is None:
            max_model_len = min(mc.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        config = EngineConfig(
            model=mc,
            cache=CacheConfig(block_size, num_kv_blocks, kv_cache_memory_gb, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, max_num_encoder_tokens),
        )
        runner = None
        if expert_parallel_size > 1:
            from engine.parallel.runner import EPLeaderRunner
            from engine.parallel.settings import config_to_json

            runner = EPLeaderRunner(config, device, expert_parallel_size, config_to_json(config),
                                    num_redundant_experts=num_redundant_experts, eplb_interval=eplb_interval,
                                    launcher=ep_launcher, dispatch=ep_dispatch)
        elif num_redundant_experts or eplb_interval:
            raise ValueError("num_redundant_experts and eplb_interval need expert_parallel_size > 1")
        try:
            tokenizer = load_tokenizer(path) if load_tokenizer_ and _has_tokenizer(path) else None
            engine = cls(config, tokenizer, device, runner)
            if mm_processor_kwargs:
                geometry_options(mm_processor_kwargs)  # ValueError for bad size options, before any request
                engine.mm_processor_kwargs = dict(mm_processor_kwargs)
            return engine
        except BaseException:
            if runner is not None:
                runner.close()
            raise

    def close(self) -> None:
        """Release processes the engine started (the ranks of an expert-parallel group)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # ----- requests in -----
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.model.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        return list(self.tokenizer(prompt).input_ids)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        limit = self.config.scheduler.max_model_len
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is required")
        if len(token_ids) >= limit:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {limit} "
                f"(the prompt must leave room for at least one generated token)"
            )
        vocab = self.config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        need = self.block_manager.blocks_needed(len(token_ids) + 1)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"prompt needs {need} KV blocks but the cache has only {self.block_manager.num_blocks}")

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.runner.model, "encode_images")

    def _multimodal_prompt(self, token_ids: list[int], data: Mapping[str, Any]) -> tuple[list[int], tuple, Any]:
        """Expand the prompt's image placeholders for `data` ({"image": one or a list}); returns
        (token ids, items, rotary positions)."""
        if not self.is_multimodal:
            raise ValueError(f"{self.config.model.architecture} takes text only; this request has multimodal data")
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise ValueError(f"multimodal data {unknown} is not supported (only 'image'; video is not supported)")
        images = data.get("image")
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if not images:
            return token_ids, (), None
        model = self.runner.model
        if self._image_processor is None:
            self._image_processor = ImageProcessor(self.config.model.path, self.config.model.architecture,
                                                   self.mm_processor_kwargs)
        processed = [self._image_processor(img) for img in images]
        token_ids, items = expand_placeholders(token_ids, model.image_token_id, processed,
                                               [model.num_image_tokens(p.grid_thw) for p in processed])
        return token_ids, items, model.mrope_positions(len(token_ids), items)

    def _make_requests(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None, hold_kv: bool,
        resume: Sequence[int] = (), multi_modal_data: Mapping[str, Any] | None = None,
    ) -> list[Request]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        items: tuple = ()
        mrope = None
        if multi_modal_data:
            token_ids, items, mrope = self._multimodal_prompt(token_ids, multi_modal_data)
        self._validate_prompt(token_ids)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if hold_kv and params.n != 1:
            raise ValueError("n > 1 is not supported for a request that holds its KV for export")
        resume = [int(t) for t in resume]
        if resume:
            self._validate_resume(token_ids, resume, params)
        reqs = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else params.seed + i
            req = Request(child_id, token_ids, params, eos_token_ids=self.eos_token_ids, prompt=text,
                          seed=seed, parent_id=request_id, index=i, hold_kv=hold_kv, mm_items=items, mrope=mrope)
            for t in resume:  # as a preempted request: output so far, no KV yet
                req.append_token(t)
                if req.logprobs is not None:
                    req.logprobs.append({})  # the client has these tokens' logprobs already
            reqs.append(req)
        return reqs

    def _validate_resume(self, prompt: list[int], resume: list[int], params: SamplingParams) -> None:
        if params.n != 1:
            raise ValueError("a resumed request continues one choice (n must be 1)")
        if len(resume) >= params.max_tokens:
            raise ValueError(f"nothing to resume: {len(resume)} tokens generated of max_tokens {params.max_tokens}")
        limit = self.config.scheduler.max_model_len
        if len(prompt) + len(resume) >= limit:
            raise ValueError(f"prompt + generated tokens ({len(prompt) + len(resume)}) leave no room under "
                             f"max_model_len {limit}")
        vocab = self.config.model.vocab_size
        bad = [t for t in resume if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generated token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _register(self, request_id: str, reqs: list[Request]) -> None:
        self.children[request_id] = [r.request_id for r in reqs]
        for r in reqs:
            self.requests[r.request_id] = r
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, r.params.skip_special_tokens)
                self.detokenizers[r.request_id] = detok
                if r.output_token_ids:  # resumed: the text so far, as the first engine streamed it
                    r.output_text = "".join(detok.add(t) for t in r.output_token_ids)
                    held = max(len(x) for x in r.params.stop) - 1 if r.params.stop else 0
                    r.sent_text_len = max(0, len(r.output_text) - held)
        self.prompt_tokens_total += reqs[0].num_prompt_tokens

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *, hold_kv: bool = False,
        resume: Sequence[int] = (), multi_modal_data: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue a request (text or token ids). Bad input raises ValueError and changes nothing.

        `resume`: tokens this request already generated elsewhere (a worker that died, or a
        sequence moved here): they count as output (max_tokens, penalties, stop strings, the
        seeded sampler's position) and only what follows them is streamed.
        `multi_modal_data`: {"image": image or list of images} (PIL images, encoded bytes, paths,
        data URLs) for a vision model; the prompt holds one run of the image placeholder token per
        image, in order, which becomes that image's tokens."""
        reqs = self._make_requests(request_id, prompt, params, hold_kv, resume, multi_modal_data)
        self._register(request_id, reqs)
        for r in reqs:
            self.scheduler.add(r)

    def abort(self, request_id: str) -> None:
        """Stop a request in any state and free its blocks. Unknown ids are ignored."""
        self._migrated_cached.pop(request_id, None)
        for child_id in self.children.pop(request_id, []):
            req = self.requests.pop(child_id, None)
            self.detokenizers.pop(child_id, None)
            if req is None:
                continue
            if req.status in (RequestStatus.HOLDING_KV, RequestStatus.WAITING_FOR_KV):
                self.block_manager.free(req)
                req.status = RequestStatus.FINISHED_ABORTED
            else:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # ----- one step -----
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns a snapshot for every request that produced a token."""
        out = self.scheduler.schedule()
        if out.empty:
            return self._fail_unschedulable()
        to_sample = [s.request for s in out.scheduled if s.samples]
        logits = self.runner.execute(out)
        self.scheduler.update_after_step(out)
        progressed: dict[str, Request] = {}
        for req, result in zip(to_sample, sample(logits, to_sample)):
            self._append(req, result.token_id, result.logprobs)
            progressed[req.request_id] = req
        return self._snapshots(progressed.values())

    def _fail_unschedulable(self) -> list[RequestOutput]:
        # Nothing ran although requests wait: the head of the queue cannot fit even in an empty
        # pool (its context outgrew the cache). End it rather than spin forever.
        if self.scheduler.waiting and not self.scheduler.running:
            req = self.scheduler.waiting[0]
            logger.warning("request %s needs more KV blocks than the cache has; finishing it", req.request_id)
            req.new_token_ids, req.new_text = (), ""
            self._finish(req, RequestStatus.FINISHED_LENGTH)
            return self._snapshots([req])
        return []

    def _append(self, req: Request, token: int, logprobs: dict[int, float] | None) -> None:
        p = req.params
        req.append_token(token)
        self.generation_tokens_total += 1
        if req.logprobs is not None and logprobs is not None:
            req.logprobs.append(logprobs)
        status: RequestStatus | None = None
        stops_allowed = req.num_output_tokens >= p.min_tokens
        if stops_allowed and ((not p.ignore_eos and token in req.eos_token_ids) or token in p.stop_token_ids):
            status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in p.stop_token_ids else None
        else:
            detok = self.detokenizers.get(req.request_id)
            if detok is not None:
                delta = detok.add(token)
                req.output_text += delta
                hit = find_stop(req.output_text, len(delta), p.stop) if stops_allowed else None
                if hit is not None:
                    start, stop = hit
                    req.output_text = req.output_text[: start + (len(stop) if p.include_stop_str_in_output else 0)]
                    status = RequestStatus.FINISHED_STOPPED
                    req.stop_reason = stop
        if status is None and (
            req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.scheduler.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        req.new_token_ids = (token,)
        # Stream only text that can no longer turn out to be the start of a stop string (held back:
        # the longest stop minus one character), so a stop spanning tokens never leaks out.
        visible = len(req.output_text)
        if status is None and p.stop:
            visible = max(req.sent_text_len, visible - (max(len(s) for s in p.stop) - 1))
        req.new_text = req.output_text[req.sent_text_len : visible]
        req.sent_text_len = visible
        if status is not None:
            self._finish(req, status)
        elif req.hold_kv:
            self.scheduler.finish(req, RequestStatus.HOLDING_KV)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.detokenizers.pop(req.request_id, None)

    def _snapshots(self, reqs) -> list[RequestOutput]:
        by_parent: dict[str, list[Request]] = {}
        for r in reqs:
            by_parent.setdefault(r.parent_id, []).append(r)
        outputs = []
        for parent, rs in by_parent.items():
            completions = tuple(_completion(r) for r in rs)
            siblings = [self.requests[c] for c in self.children.get(parent, []) if c in self.requests]
            done = all(s.status.finished or s.status is RequestStatus.HOLDING_KV for s in siblings)
            first = rs[0]
            outputs.append(RequestOutput(parent, first.prompt, tuple(first.prompt_token_ids), completions, done,
                                         first.num_cached_tokens, kv_held=first.status is RequestStatus.HOLDING_KV))
            if done:
                for s in siblings:
                    if s.status.finished:
                        self.requests.pop(s.request_id, None)
                if not any(c in self.requests for c in self.children.get(parent, [])):
                    self.children.pop(parent, None)
        return outputs

    # ----- KV seam: export side -----
    def _held(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.HOLDING_KV:
            raise ValueError(f"request {request_id!r} is not holding KV for export")
        return req

    def held_kv_blocks(self, request_id: str) -> tuple[int, ...]:
        """Block ids holding the prompt's KV of a finished `hold_kv` request, in token order."""
        req = self._held(request_id)
        return tuple(req.block_ids[: self.block_manager.blocks_needed(req.num_computed_tokens)])

    def export_kv(self, request_id: str, out: torch.Tensor | None = None, start_block: int = 0) -> torch.Tensor:
        """Copy a held request's prompt KV (from block `start_block` on) into a buffer."""
        return self.runner.export_blocks(list(self.held_kv_blocks(request_id)[start_block:]), out)

    def release_kv(self, request_id: str) -> None:
        """The receiver has the KV (or gave up): unpin the blocks. They stay in the prefix cache."""
        req = self._held(request_id)
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED_STOPPED
        self.requests.pop(request_id, None)
        self.children.pop(req.parent_id, None)

    # ----- KV seam: import side -----
    def held_kv_multimodal(self, request_id: str) -> tuple[tuple[tuple[int, int, int], ...], int | None]:
        """What a receiving engine needs of a held request's images: their spans (offset, length,
        content hash: for its prefix cache) and the rotary delta (None for a text-only prompt)."""
        req = self._held(request_id)
        return req.mm_spans, None if req.mrope is None else req.mrope.delta

    def _received_multimodal(self, req: Request, mm_spans: Sequence[tuple[int, int, int]], mrope_delta: int | None) -> None:
        # No pixels: the KV of every image token comes with the request.
        req.mm_items = tuple(MultiModalItem("image", o, n, None, h) for o, n, h in mm_spans)
        req.mm_spans = tuple(item.span for item in req.mm_items)
        req.mrope = None if mrope_delta is None else MRopePositions(None, int(mrope_delta))

    def add_prefilled_request(
        self, request_id: str, prompt_token_ids: list[int], first_token_id: int, params: SamplingParams | None = None,
        mm_spans: Sequence[tuple[int, int, int]] = (), mrope_delta: int | None = None,
    ) -> KVImport:
        """Allocate blocks for a prompt prefilled elsewhere; reuses this engine's prefix cache.
        A prompt with images names them by `mm_spans` and carries its rotary `mrope_delta`
        (`held_kv_multimodal` on the sending engine)."""
        (req,) = self._make_requests(request_id, list(prompt_token_ids), params, hold_kv=False)
        self._received_multimodal(req, mm_spans, mrope_delta)
        cached, hashes = self.block_manager.lookup_prefix(req.prompt_token_ids, req.mm_spans)
        if not self.block_manager.allocate(req, req.num_prompt_tokens, cached, hashes):
            raise MemoryError(f"no KV blocks free for {req.num_prompt_tokens} tokens of request {request_id!r}")
        self.block_manager.record_prefix_lookup(req.num_prompt_tokens, len(cached))
        req.num_cached_tokens = len(cached) * self.block_manager.block_size
        req.status = RequestStatus.WAITING_FOR_KV
        self._register(request_id, [req])
        req.pending_first_token = int(first_token_id)
        return KVImport(tuple(req.block_ids), len(cached))

    def import_kv(self, request_id: str, data: torch.Tensor, start_block: int = 0) -> None:
        """Write exported KV into the request's blocks from `start_block` on."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_KV:
            raise ValueError(f"request {request_id!r} is not waiting for KV")
        self.runner.import_blocks(req.block_ids[start_block : start_block + data.shape[1]], data)

    def finish_kv_import(self, request_id: str) -> list[RequestOutput]:
        """The KV is in place: the request continues from its first token. Returns its first snapshot."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_KV:
            raise ValueError(f"request {request_id!r} is not waiting for KV")
        # Blocks found in this engine's prefix cache were computed here; the rest were imported.
        self.runner.sync_blocks(list(req.block_ids[req.num_cached_tokens // self.block_manager.block_size :]))
        req.num_computed_tokens = req.num_prompt_tokens
        self.block_manager.cache_full_blocks(req)
        self.scheduler.add_running(req)
        self._append(req, req.pending_first_token, None)
        self.generation_tokens_total -= 1  # sampled (and counted) by the prefill engine
        return self._snapshots([req])

    # ----- KV seam: moving a running request (live migration) -----
    def hold_running_kv(self, request_id: str) -> int:
        """Stop a decoding request here to move it, KV and all, to another engine: it leaves the
        scheduler with its blocks pinned (HOLDING_KV, then `held_kv_blocks` / `export_kv` /
        `release_kv` as for a prefilled prompt). Returns the tokens whose KV the blocks hold:
        prompt + generated - 1 (the last sampled token's KV is computed where it continues).
        ValueError unless it is running one sequence between decode steps (e.g. mid-prefill or
        preempted: resume it by recompute instead)."""
        req = self.requests.get(request_id)
        if (req is None or req.parent_id != request_id or req.status is not RequestStatus.RUNNING
                or not req.output_token_ids or req.num_computed_tokens != req.num_tokens - 1):
            raise ValueError(f"request {request_id!r} is not a running single sequence between decode steps")
        self.scheduler.finish(req, RequestStatus.HOLDING_KV)
        self.detokenizers.pop(request_id, None)
        return req.num_computed_tokens

    def add_migrated_request(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                             params: SamplingParams | None = None, mm_spans: Sequence[tuple[int, int, int]] = (),
                             mrope_delta: int | None = None) -> KVImport:
        """Allocate blocks for a request moved here mid-generation (see `hold_running_kv`): its
        output so far counts as output (as with `add_request(resume=...)`), and the KV of every
        token but the last is to be written into the blocks (those this engine's prefix cache
        already holds are reused). Then `import_kv`, and `finish_migrated_import`."""
        (req,) = self._make_requests(request_id, list(prompt_token_ids), params, hold_kv=False,
                                     resume=output_token_ids)
        if not req.output_token_ids:
            raise ValueError(f"a migrated request needs its generated tokens (request {request_id!r})")
        self._received_multimodal(req, mm_spans, mrope_delta)
        num_kv = req.num_tokens - 1
        cached, hashes = self.block_manager.lookup_prefix(req.all_token_ids, req.mm_spans)
        if not self.block_manager.allocate(req, num_kv, cached, hashes):
            raise MemoryError(f"no KV blocks free for {num_kv} tokens of request {request_id!r}")
        self.block_manager.record_prefix_lookup(req.num_tokens, len(cached))
        req.num_cached_tokens = min(len(cached) * self.block_manager.block_size, req.num_prompt_tokens)
        req.status = RequestStatus.WAITING_FOR_KV
        self._register(request_id, [req])
        self._migrated_cached[request_id] = len(cached)
        return KVImport(tuple(req.block_ids), len(cached))

    def finish_migrated_import(self, request_id: str) -> None:
        """The moved request's KV is in place: it runs on from its last token (the next step
        computes that token's KV and samples the one after it, as the first engine would have)."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_KV or request_id not in self._migrated_cached:
            raise ValueError(f"request {request_id!r} is not a migrated request waiting for KV")
        cached = self._migrated_cached.pop(request_id)
        self.runner.sync_blocks(list(req.block_ids[cached:]))
        req.num_computed_tokens = req.num_tokens - 1
        self.block_manager.cache_full_blocks(req)
        self.scheduler.add_running(req)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, vocab] at every position of a token sequence (for perplexity / quality checks).

        Runs outside the scheduler with blocks of its own, freed before returning.
        """
        self._validate_prompt(list(token_ids))
        req = Request("__score__", list(token_ids), SamplingParams())
        if not self.block_manager.allocate(req, req.num_tokens):
            raise MemoryError(f"no KV blocks free to score {req.num_tokens} tokens")
        try:
            return self.runner.prompt_logits(req.prompt_token_ids, req.block_ids)
        finally:
            self.block_manager.free(req)

    # ----- introspection -----
    def stats(self) -> EngineStats:
        held = sum(1 for r in self.requests.values() if r.status is RequestStatus.HOLDING_KV)
        importing = sum(1 for r in self.requests.values() if r.status is RequestStatus.WAITING_FOR_KV)
        bm = self.block_manager
        return EngineStats(len(self.scheduler.waiting), len(self.scheduler.running), held, importing,
                           bm.num_free_blocks, bm.num_blocks, bm.prefix_queries, bm.prefix_hits,
                           self.scheduler.num_preemptions, self.prompt_tokens_total, self.generation_tokens_total)

    def leaks(self) -> list[str]:
        """Everything that should be empty when no request is in flight (for tests and drains)."""
        problems = []
        if self.requests:
            problems.append(f"requests still tracked: {sorted(self.requests)}")
        if self._migrated_cached:
            problems.append(f"migrated imports never finished: {sorted(self._migrated_cached)}")
        if self.scheduler.waiting or self.scheduler.running:
            problems.append(f"queues not empty: waiting={len(self.scheduler.waiting)} running={len(self.scheduler.running)}")
        used = [b for b, c in enumerate(self.block_manager.ref_counts) if c]
        if used or self.block_manager.num_free_blocks != self.block_manager.num_blocks:
            problems.append(f"blocks still referenced: {used[:10]}")
        return problems


def _completion(r: Request) -> CompletionOutput:
    return CompletionOutput(
        index=r.index,
        text=r.output_text,
        token_ids=tuple(r.output_token_ids),
        finish_reason=r.status.finish_reason,
        stop_reason=r.stop_reason,
        logprobs=tuple(r.logprobs) if r.logprobs is not None else None,
        new_token_ids=r.new_token_ids,
        new_text=r.new_text,
    )


def _has_tokenizer(path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
