"""LocalBackend: the Backend protocol over an engine in this process (no workers, no network hop).

Used for single-process serving and for testing the HTTP layer against a real engine.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from cluster.errors import InvalidRequestError
from cluster.router.backend import GenerationRequest, ModelInfo
from cluster.router.model import default_served_name
from cluster.worker.convert import output_to_chunk
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.stats import stats_response
from engine.llm_engine import LLMEngine
from pdcommon.vision import VisionInfo
from pdserve.v1 import worker_pb2


class LocalBackend:
    """Runs every request on one in-process engine (the `mixed` role without gRPC)."""

    def __init__(self, engine: LLMEngine, served_model_name: str) -> None:
        if engine.tokenizer is None:
            raise ValueError("the HTTP API needs a model with a tokenizer")
        self.loop = EngineLoop(engine)
        vision = VisionInfo.from_folder(engine.config.model.path, engine.mm_processor_kwargs) \
            if engine.is_multimodal else None
        self.model = ModelInfo(served_model_name, engine.config.scheduler.max_model_len, engine.tokenizer,
                               engine.eos_token_ids, int(time.time()), vision)

    @classmethod
    def from_args(cls, model: str | None = None, served_model_name: str | None = None, **engine_args) -> "LocalBackend":
        engine = LLMEngine.from_args(model, **engine_args)
        return cls(engine, served_model_name or default_served_name(model))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        try:
            media = {"image": [img.data for img in request.images]} if request.images else None
            stream = self.loop.generate(request.request_id, list(request.prompt_token_ids), request.params,
                                        multi_modal_data=media)
            async for out in stream:
                yield output_to_chunk(out, request.params.logprobs)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc

    async def readiness(self) -> tuple[bool, str]:
        return (True, "ready") if self.loop.alive else (False, "engine loop stopped")

    async def worker_stats(self) -> list[worker_pb2.StatsResponse]:
        stats = await self.loop.call(lambda e: e.stats())
        return [stats_response("local", worker_pb2.ROLE_MIXED, 0, stats)]

    async def close(self) -> None:
        await asyncio.to_thread(self.loop.stop)
