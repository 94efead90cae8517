"""Logprobs in OpenAI's two shapes, from the backend's `TokenLogprobs` (token ids and floats).

Token strings are the tokenizer's decoding of each single token, as vLLM reports them (a token
that is part of a multi-byte character decodes to U+FFFD; `bytes` then tells the truth only in
aggregate, as with OpenAI).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from cluster.router.openai import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from pdserve.v1 import worker_pb2

# JSON has no -inf; vLLM reports impossible tokens with this value too.
MIN_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


class TokenText:
    """Cached single-token decoding (the same few thousand tokens come back all the time)."""

    def __init__(self, tokenizer: Any, max_entries: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._max = max_entries

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._cache) < self._max:
                self._cache[token_id] = text
        return text


def chat_logprobs(entries: Iterable[worker_pb2.TokenLogprobs], text: TokenText) -> ChatLogprobs:
    content = []
    for e in entries:
        tok = text(e.token_id)
        top = [TopLogprob(token=(t := text(x.token_id)), logprob=_finite(x.logprob), bytes=list(t.encode()))
               for x in e.top]
        content.append(ChatTokenLogprob(token=tok, logprob=_finite(e.logprob), bytes=list(tok.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: Iterable[worker_pb2.TokenLogprobs], text: TokenText,
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """Logprobs for these tokens with text offsets starting at `offset`; returns the next offset."""
    # Fields passed explicitly: stream chunks are serialised with exclude_unset.
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for e in entries:
        tok = text(e.token_id)
        out.tokens.append(tok)
        out.token_logprobs.append(_finite(e.logprob))
        # OpenAI's top_logprobs map includes the sampled token (vLLM does the same).
        top = {text(x.token_id): _finite(x.logprob) for x in e.top}
        top.setdefault(tok, _finite(e.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(tok)
    return out, offset
