"""POST /v1/completions: prompt(s) -> n sequences each -> one response or an SSE stream."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from cluster.metrics import RequestTracker
from cluster.router.logprobs import completion_logprobs
from cluster.router.openai import CompletionChoice, CompletionRequest, CompletionResponse
from cluster.router.serving import (ChoiceState, Item, Prompt, RouterState, SSEResponse, check_model, choice_states,
                                    completion_prompts, fan_out, max_tokens_for, merged, respond, sampling_params,
                                    sse_events, usage)
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)


async def create_completion(state: RouterState, http: Request, req: CompletionRequest) -> Response:
    arrival = time.perf_counter()
    check_model(state, req.model)
    info = state.backend.model
    prompts = completion_prompts(info.tokenizer, req.prompt)
    params = [sampling_params(req, max_tokens_for(len(p.token_ids), req.max_tokens, info.max_model_len),
                              req.logprobs) for p in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    seqs = fan_out(request_id, prompts, params, req.n)
    choices = choice_states(seqs, info.eos_token_ids)
    tracker = state.metrics.track([len(p.token_ids) for p in prompts], req.n, arrival)
    logger.debug("request %s: completion, %d prompt(s), n=%d, stream=%s", request_id, len(prompts), req.n,
                 req.stream)
    # `object` passed explicitly: stream chunks are serialised with exclude_unset.
    head = dict(id=request_id, object="text_completion", created=int(time.time()), model=state.model_name)
    stream = merged(state.backend, seqs)
    tracker.submitted()
    return await respond(
        http, request_id, tracker, stream, req.stream,
        sse=lambda first: SSEResponse(_events(state, req, head, choices, prompts, tracker, first, stream)),
        collect=lambda: _collect(state, req, stream, choices, tracker),
        body=lambda: _response(state, req, head, choices, prompts),
    )


def _response(state: RouterState, req: CompletionRequest, head: dict, choices: dict[int, ChoiceState],
              prompts: list[Prompt]) -> Response:
    out = []
    for c in choices.values():
        logprobs = completion_logprobs(c.logprobs, state.token_text)[0] if req.logprobs is not None else None
        out.append(CompletionChoice(index=c.index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                                    stop_reason=c.stop_reason))
    body = CompletionResponse(**head, choices=out, usage=usage(choices, prompts))
    return Response(body.model_dump_json(), media_type="application/json")


def _echo(state: RouterState, req: CompletionRequest, c: ChoiceState) -> str:
    """The prompt text to put before a choice's first text (echo=true)."""
    if not req.echo or c.started:
        return ""
    c.started = True
    p: Prompt = c.prompt
    return p.text if p.text is not None else state.backend.model.tokenizer.decode(list(p.token_ids))


async def _collect(state: RouterState, req: CompletionRequest, stream: AsyncIterator[tuple[int, worker_pb2.TokenChunk]],
                   choices: dict[int, ChoiceState], tracker: RequestTracker) -> None:
    for c in choices.values():
        c.text_parts.append(_echo(state, req, c))
    async for index, chunk in stream:
        tracker.on_chunk(index, chunk)
        c = choices[index]
        c.add(chunk)
        c.text_parts.append(chunk.text)
        c.logprobs.extend(chunk.logprobs)


def _events(state: RouterState, req: CompletionRequest, head: dict, choices: dict[int, ChoiceState],
            prompts: list[Prompt], tracker: RequestTracker, first: Item, stream: AsyncIterator[Item]) -> AsyncIterator[str]:
    def render(index: int, chunk: worker_pb2.TokenChunk) -> CompletionResponse | None:
        choice = _delta(state, req, choices[index], chunk)
        return None if choice is None else CompletionResponse(**head, choices=[choice])

    def final() -> CompletionResponse | None:
        return CompletionResponse(**head, choices=[], usage=usage(choices, prompts)) if req.include_usage else None

    return sse_events(head["id"], tracker, first, stream, render, final)


def _delta(state: RouterState, req: CompletionRequest, c: ChoiceState,
           chunk: worker_pb2.TokenChunk) -> CompletionChoice | None:
    c.add(chunk)
    text = _echo(state, req, c) + chunk.text
    logprobs = None
    if req.logprobs is not None and chunk.logprobs:
        logprobs, c.text_offset = completion_logprobs(chunk.logprobs, state.token_text, c.text_offset)
    if not (text or logprobs or c.finish_reason):
        return None
    return CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)
