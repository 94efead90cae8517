"""What the HTTP layer needs from whatever runs requests: the Backend protocol.

The app (cluster/router/app.py) validates, tokenizes and formats; a Backend runs one sequence and
streams `worker_pb2.TokenChunk` deltas. Two implementations: `ClusterBackend` (picks prefill and
decode workers and talks gRPC to them) and `LocalBackend` (an engine in this process; tests and
single-process use). `n > 1` is fanned out by the app as n sequences.

Streaming convention: `generate` yields chunks until one carries a finish reason. If the consumer
stops early (client disconnect: the task is cancelled, or the generator is closed), the backend
aborts the request on whichever worker holds it before the generator finishes closing.
Errors are raised as `cluster.errors.PdserveError` subclasses.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdcommon.sampling_params import SamplingParams
from pdcommon.vision import VisionInfo
from pdserve.v1 import worker_pb2


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt as the router sends it: the encoded bytes (what the prefill worker
    decodes and preprocesses), its content hash, and where its run of placeholder tokens sits in
    the prompt (already as long as the image's tokens)."""

    data: bytes = field(repr=False)
    content_hash: int
    offset: int
    length: int

    @property
    def span(self) -> tuple[int, int, int]:
        return (self.offset, self.length, self.content_hash)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams  # n == 1: the app fans out n > 1
    images: tuple[PromptImage, ...] = ()

    @property
    def mm_spans(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(img.span for img in self.images)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served model name (`--served-model-name`, default: the model folder's name)
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer: chat template, tokenize, detokenize
    eos_token_ids: tuple[int, ...]
    created: int  # unix time the backend started, for /v1/models
    vision: VisionInfo | None = None  # a vision model: its image placeholder and resize rule


class Backend(Protocol):
    model: ModelInfo

    def generate(self, request: GenerationRequest) -> AsyncIterator[worker_pb2.TokenChunk]:
        """Run one sequence; yields deltas; the last chunk has a finish_reason."""
        ...

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready when every role a request needs has a ready worker."""
        ...

    async def worker_stats(self) -> list[worker_pb2.StatsResponse]:
        """Current stats of every known worker (for /metrics)."""
        ...

    async def close(self) -> None: ...
