"""POST /v1/chat/completions: chat template -> n sequences -> one response or an SSE stream."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from cluster.metrics import RequestTracker
from cluster.router.logprobs import chat_logprobs
from cluster.router.media.content import has_media
from cluster.router.media.prompt import multimodal_chat_prompt
from cluster.router.openai import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                   ChatCompletionRequest, ChatCompletionResponse, DeltaMessage)
from cluster.router.serving import (ChoiceState, Item, RouterState, SSEResponse, chat_prompt, check_model,
                                    choice_states, fan_out, max_tokens_for, merged, respond, sampling_params,
                                    sse_events, usage)
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)


async def create_chat_completion(state: RouterState, http: Request, req: ChatCompletionRequest) -> Response:
    arrival = time.perf_counter()
    check_model(state, req.model)
    info = state.backend.model
    if has_media(req.messages):
        prompt = await multimodal_chat_prompt(state, req.messages, req.add_generation_prompt,
                                              req.continue_final_message, req.chat_template_kwargs)
    else:
        prompt = chat_prompt(info.tokenizer, req)
    max_tokens = max_tokens_for(len(prompt.token_ids), req.requested_max_tokens, info.max_model_len)
    params = sampling_params(req, max_tokens, req.num_logprobs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    seqs = fan_out(request_id, [prompt], [params], req.n)
    choices = choice_states(seqs, info.eos_token_ids, state.reasoning)
    tracker = state.metrics.track([len(prompt.token_ids)], req.n, arrival)
    logger.debug("request %s: chat, %d prompt tokens (%d images), n=%d, max_tokens=%d, stream=%s", request_id,
                 len(prompt.token_ids), len(prompt.images), req.n, max_tokens, req.stream)
    head = dict(id=request_id, created=int(time.time()), model=state.model_name)
    stream = merged(state.backend, seqs)
    tracker.submitted()
    # `object` passed explicitly: stream chunks are serialised with exclude_unset.
    chunk_head = {**head, "object": "chat.completion.chunk"}
    return await respond(
        http, request_id, tracker, stream, req.stream,
        sse=lambda first: SSEResponse(_events(state, req, chunk_head, choices, tracker, first, stream)),
        collect=lambda: _collect(stream, choices, tracker),
        body=lambda: _response(state, req, head, choices, [prompt]),
    )


async def _collect(stream: AsyncIterator[tuple[int, worker_pb2.TokenChunk]], choices: dict[int, ChoiceState],
                   tracker: RequestTracker) -> None:
    async for index, chunk in stream:
        tracker.on_chunk(index, chunk)
        c = choices[index]
        c.add(chunk)
        c.text_parts.append(chunk.text)
        c.logprobs.extend(chunk.logprobs)


def _response(state: RouterState, req: ChatCompletionRequest, head: dict, choices: dict[int, ChoiceState],
              prompts) -> Response:
    out = []
    for c in choices.values():
        text, reasoning = c.text, None
        if c.parser is not None:
            split = c.parser.parse(text)
            reasoning = split.reasoning
            # After reasoning, an empty answer is null (as vLLM reports it).
            text = split.content if split.content or reasoning is None else None
        logprobs = chat_logprobs(c.logprobs, state.token_text) if req.logprobs else None
        out.append(ChatChoice(index=c.index, message=AssistantMessage(content=text, reasoning_content=reasoning,
                                                                      reasoning=reasoning),
                              logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    body = ChatCompletionResponse(**head, choices=out, usage=usage(choices, prompts))
    return Response(body.model_dump_json(), media_type="application/json")


def _events(state: RouterState, req: ChatCompletionRequest, head: dict, choices: dict[int, ChoiceState],
            tracker: RequestTracker, first: Item, stream: AsyncIterator[Item]) -> AsyncIterator[str]:
    roles = [ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=c.index, logprobs=None, finish_reason=None,
                                                                  delta=DeltaMessage(role="assistant", content=""))])
             for c in choices.values()]

    def render(index: int, chunk: worker_pb2.TokenChunk) -> ChatCompletionChunk | None:
        choice = _delta(state, req, choices[index], chunk)
        return None if choice is None else ChatCompletionChunk(**head, choices=[choice])

    def final() -> ChatCompletionChunk | None:
        if not req.include_usage:
            return None
        return ChatCompletionChunk(**head, choices=[], usage=usage(choices, [choices[0].prompt]))

    return sse_events(head["id"], tracker, first, stream, render, final, preamble=roles)


def _delta(state: RouterState, req: ChatCompletionRequest, c: ChoiceState,
           chunk: worker_pb2.TokenChunk) -> ChatChunkChoice | None:
    c.add(chunk)
    finished = c.finish_reason is not None
    reasoning, content = "", chunk.text
    if c.parser is not None:
        split = c.parser.feed(chunk.text)
        reasoning, content = split.reasoning, split.content
        if finished:
            tail = c.parser.flush()
            reasoning, content = reasoning + tail.reasoning, content + tail.content
    logprobs = chat_logprobs(chunk.logprobs, state.token_text) if req.logprobs and chunk.logprobs else None
    if not (reasoning or content or logprobs or finished):
        return None  # e.g. tokens whose text is held back (partial character, possible stop string)
    fields: dict = {}
    if content or (logprobs and not reasoning):
        fields["content"] = content
    if reasoning:
        fields["reasoning_content"] = fields["reasoning"] = reasoning
    return ChatChunkChoice(index=c.index, delta=DeltaMessage(**fields), logprobs=logprobs,
                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)
