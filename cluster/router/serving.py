"""What chat and completions share: prompts, sampling parameters, fan-out of n sequences, and
watching the client so that abandoned requests are cancelled.

A request becomes `Sequence`s: for completions with several prompts, prompt p's choice i has
index p * n + i and request id f"{id}-{index}" (OpenAI's order of choices). With a seed, choice i
of a prompt gets seed + i, so choices differ yet are reproducible.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as Sequence_  # `Sequence` below is a fanned-out sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from cluster.errors import InvalidRequestError, ModelNotFoundError, PdserveError, WorkerError
from cluster.metrics import FINISH_NAMES, RequestTracker, RouterMetrics
from cluster.router.backend import Backend, GenerationRequest, PromptImage
from cluster.router.logprobs import TokenText
from cluster.router.media.fetch import MediaLoader
from cluster.router.media.policy import MediaSettings
from cluster.router.openai import ChatCompletionRequest, ChatMessage, UsageInfo, _SamplingRequest, error_body
from cluster.router.reasoning import ParserFactory, ReasoningParser, prompt_opens_reasoning
from cluster.router.settings import RouterSettings
from pdcommon.sampling_params import SamplingParams
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")

_END = object()
_PARAM_NAME = re.compile(r"SamplingParams\.(\w+)=")


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


@dataclass
class RouterState:
    """Everything a handler needs: one per app."""

    backend: Backend
    settings: RouterSettings
    metrics: RouterMetrics
    model_name: str
    token_text: TokenText
    reasoning: ParserFactory | None
    media: MediaSettings = field(default_factory=MediaSettings)  # enable_mm resolved against the model
    media_loader: MediaLoader | None = None


def check_model(state: RouterState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


@dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]
    text: str | None  # the rendered prompt (chat template applied), None for token-id prompts
    images: tuple[PromptImage, ...] = ()  # a vision model's images, their placeholder runs in token_ids


@dataclass(frozen=True)
class Sequence:
    index: int
    prompt: Prompt
    request: GenerationRequest


# ----- prompts -----
def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: content as one string (text parts joined)."""
    out = []
    for m in messages:
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None
        out.append({**m.model_dump(exclude_none=True), "content": text if text is not None else ""})
    return out


def render_chat(tokenizer: Any, messages: list[ChatMessage] | list[dict[str, Any]], add_generation_prompt: bool,
                continue_final_message: bool, template_kwargs: dict[str, Any] | None) -> str:
    """The chat template applied to `messages` (ChatMessages, or dicts as a template takes them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template: use /v1/completions")
    if messages and isinstance(messages[0], ChatMessage):
        messages = chat_messages(messages)  # type: ignore[arg-type]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(template_kwargs or {}))
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - template errors (jinja, bad roles) are the caller's
        raise InvalidRequestError(f"could not apply the chat template: {exc}", param="messages") from None


def chat_prompt(tokenizer: Any, req: ChatCompletionRequest) -> Prompt:
    text = render_chat(tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message,
                       req.chat_template_kwargs)
    # The template already wrote any BOS/special tokens it wants: adding them again would double them.
    return Prompt(tuple(tokenizer(text, add_special_tokens=False).input_ids), text)


def completion_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]  # type: ignore[list-item]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(Prompt(tuple(tokenizer(p).input_ids), p))
        else:
            out.append(Prompt(tuple(p), None))
    for p in out:
        if not p.token_ids:
            raise InvalidRequestError("prompt is empty: at least one token is required", param="prompt")
    return out


def max_tokens_for(prompt_len: int, requested: int | None, max_model_len: int) -> int:
    """The completion budget: as requested, or whatever the context leaves (vLLM's default)."""
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your messages resulted "
            f"in {prompt_len} tokens. Please reduce the length of the messages.", param="messages")
    if requested is None:
        return max_model_len - prompt_len
    if requested >= 1 and prompt_len + requested > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
            f"Please reduce the length of the messages or completion.", param="max_tokens")
    return requested


def sampling_params(req: _SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs, req.seed)
    except ValueError as exc:
        match = _PARAM_NAME.search(str(exc))
        raise InvalidRequestError(str(exc), param=match.group(1) if match else None) from None


def fan_out(request_id: str, prompts: list[Prompt], params: list[SamplingParams], n: int) -> list[Sequence]:
    seqs = []
    for p, (prompt, sp) in enumerate(zip(prompts, params)):
        for i in range(n):
            index = p * n + i
            seq_params = replace(sp, seed=sp.seed + i) if sp.seed is not None and i else sp
            seqs.append(Sequence(index, prompt, GenerationRequest(f"{request_id}-{index}", prompt.token_ids,
                                                                  seq_params, prompt.images)))
    return seqs


# ----- running -----
async def merged(backend: Backend, seqs: list[Sequence]) -> AsyncIterator[tuple[int, worker_pb2.TokenChunk]]:
    """Every sequence's chunks as (index, chunk), interleaved as they come.

    One task per sequence. Closing this iterator (or an error in one sequence) cancels the other
    tasks, which closes their backend generators: that is what makes the backend abort them.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    closing = False

    async def pump(seq: Sequence) -> None:
        gen = backend.generate(seq.request)
        finished = False
        try:
            async for chunk in gen:
                queue.put_nowait((seq.index, chunk))
                if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
                    finished = True
                    break
            if not finished:
                raise WorkerError(f"the backend ended sequence {seq.request.request_id} without a finish reason")
            queue.put_nowait((seq.index, _END))
        except asyncio.CancelledError:
            if closing:
                raise
            # Not ours: the backend aborted the sequence (e.g. engine-side abort); without this the
            # consumer would wait for it forever.
            queue.put_nowait((seq.index, WorkerError(f"sequence {seq.request.request_id} was aborted")))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((seq.index, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(s), name=s.request.request_id) for s in seqs]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        closing = True
        for t in tasks:
            t.cancel()
        # Shielded: we may be here because our own task was cancelled (client gone), and the
        # backend generators must still get to run their abort paths.
        with anyio.CancelScope(shield=True):
            await asyncio.wait(tasks, timeout=10.0)


async def wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read: receive() blocks until then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task}, timeout=10.0)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def respond(http: Request, request_id: str, tracker: RequestTracker, stream: AsyncIterator[Item],
                  streaming: bool, sse: Callable[[Item], Response], collect: Callable[[], Awaitable[None]],
                  body: Callable[[], Response]) -> Response:
    """Run a request's merged output `stream` to its HTTP response: SSE built by `sse(first item)`,
    or `collect()` everything and answer `body()`. The first item comes before the headers, so
    errors before any output (no worker, bad prompt) get their own HTTP status instead of a 200
    with an error event. A client gone before the response gets 499; the tracker is closed."""
    try:
        if streaming:
            first = await unless_disconnected(http, anext(stream))
            return sse(first)
        await unless_disconnected(http, collect())
    except ClientGone:
        logger.info("request %s: client disconnected before the response; cancelled", request_id)
        tracker.close()
        return Response(status_code=499)
    except Exception as exc:
        log_failure(request_id, exc)
        tracker.close()
        await stream.aclose()
        raise
    tracker.close()
    return body()


def log_failure(request_id: str, exc: BaseException) -> None:
    if isinstance(exc, PdserveError):
        logger.info("request %s failed: %s %s", request_id, exc.status, exc.message)
    else:
        logger.error("request %s failed", request_id, exc_info=exc)


# ----- per-choice accumulation -----
@dataclass
class ChoiceState:
    """One output sequence as its chunks arrive."""

    index: int
    prompt: Prompt
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    parser: ReasoningParser | None = None
    num_tokens: int = 0
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[worker_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions logprobs: where the next token starts in the output text
    started: bool = False  # completions echo: the prompt goes before the first delta

    def add(self, chunk: worker_pb2.TokenChunk) -> None:
        self.num_tokens += len(chunk.token_ids)
        if chunk.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_NAMES.get(chunk.finish_reason, "abort")
            self.stop_reason = self._stop_reason(chunk.stop_reason)

    def _stop_reason(self, raw: str) -> int | str | None:
        """vLLM's stop_reason: the stop string, or the stop token id; None for EOS and length."""
        if not raw or self.finish_reason != "stop":
            return None
        if raw in self.params.stop:
            return raw
        try:
            token = int(raw)
        except ValueError:
            return raw
        return None if token in self.eos_token_ids and token not in self.params.stop_token_ids else token

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def choice_states(seqs: list[Sequence], eos_token_ids: tuple[int, ...],
                  reasoning: ParserFactory | None = None) -> dict[int, ChoiceState]:
    return {s.index: ChoiceState(s.index, s.prompt, s.request.params, eos_token_ids,
                                 reasoning(prompt_opens_reasoning(s.prompt.text)) if reasoning else None)
            for s in seqs}


def usage(choices: dict[int, ChoiceState], prompts: list[Prompt]) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion = sum(c.num_tokens for c in choices.values())
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


# ----- server-sent events -----
def sse(payload: BaseModel) -> str:
    # exclude_unset: stream chunks carry only what each one sets (null finish_reason included).
    return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"


def sse_error(exc: BaseException) -> str:
    err = exc if isinstance(exc, PdserveError) else PdserveError("internal error while generating")
    return f"data: {json.dumps(error_body(err))}\n\n"


SSE_DONE = "data: [DONE]\n\n"

Item = tuple[int, worker_pb2.TokenChunk]


async def sse_events(request_id: str, tracker: RequestTracker, first: Item, stream: AsyncIterator[Item],
                     render: Callable[[int, worker_pb2.TokenChunk], BaseModel | None],
                     final: Callable[[], BaseModel | None], preamble: Sequence_[BaseModel] = ()) -> AsyncIterator[str]:
    """The SSE body of chat and completions: the preamble, one event per rendered delta, the final
    (usage) event if any, an error event if the backend fails mid-stream, then [DONE]. The backend
    stream is closed whatever happens (a client that goes away aborts the request)."""
    try:
        for payload in preamble:
            yield sse(payload)
        item: Item | None = first
        while item is not None:
            index, chunk = item
            tracker.on_chunk(index, chunk)
            payload = render(index, chunk)
            if payload is not None:
                yield sse(payload)
            item = await anext(stream, None)
        payload = final()
        if payload is not None:
            yield sse(payload)
    except Exception as exc:  # noqa: BLE001 - mid-stream errors go to the client as an error event
        log_failure(request_id, exc)
        yield sse_error(exc)
    finally:
        await stream.aclose()
        tracker.close()
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its iterator, however the stream ends.

    Starlette cancels the stream when it sees the client go (ASGI < 2.4) or stops at a failed
    send (2.4); either way the generator must be closed now so that the backend aborts.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        # no-cache / no buffering: proxies (nginx) must pass each event on as it comes.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
