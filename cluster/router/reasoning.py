"""Reasoning parsers: split `<think>reasoning</think>content` into reasoning_content and content.

Two entry points that give the same answer for the same text: `parse(text)` (one shot, for full
responses) and `feed(delta)` ... `flush()` (streaming, where a tag can be split across deltas:
text that may be the start of a tag is held back until it is decided).

Where the output starts inside reasoning: a chat template may open `<think>` itself (the prompt
ends with it), so the model's output has only the closing tag, as vLLM's deepseek_r1 parser
assumes. The app passes `start_in_reasoning=True` then (see `prompt_opens_reasoning`); the
`deepseek_r1` parser always assumes it. Otherwise reasoning is recognised only when the output
begins (after whitespace) with `<think>`; anything else is content, verbatim.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # None: the output has no reasoning section
    content: str


@dataclass(frozen=True)
class DeltaSplit:
    reasoning: str = ""
    content: str = ""


class ReasoningParser(Protocol):
    def parse(self, text: str) -> ReasoningSplit: ...

    def feed(self, text: str) -> DeltaSplit: ...

    def flush(self) -> DeltaSplit: ...

    @property
    def saw_reasoning(self) -> bool: ...


_START, _REASONING_START, _REASONING, _CONTENT = range(4)


class ThinkReasoningParser:
    """`<think>...</think>`; one instance per output sequence (streaming keeps state)."""

    def __init__(self, start_in_reasoning: bool = False) -> None:
        self.start_in_reasoning = start_in_reasoning
        self._mode = _REASONING_START if start_in_reasoning else _START
        self._buf = ""
        self._saw = start_in_reasoning

    @property
    def saw_reasoning(self) -> bool:
        return self._saw

    # ----- one shot -----
    def parse(self, text: str) -> ReasoningSplit:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):
            body = stripped[len(THINK_OPEN):]
        elif self.start_in_reasoning:
            body = text
        else:
            return ReasoningSplit(None, text)
        reasoning, _, content = body.partition(THINK_CLOSE)
        return ReasoningSplit(reasoning, content)

    # ----- streaming -----
    def feed(self, text: str) -> DeltaSplit:
        self._buf += text
        reasoning, content = [], []
        while True:
            if self._mode in (_START, _REASONING_START):
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buf = stripped[len(THINK_OPEN):]
                    self._mode, self._saw = _REASONING, True
                    continue
                if THINK_OPEN.startswith(stripped):
                    break  # still undecided: hold everything
                self._mode = _REASONING if self._mode == _REASONING_START else _CONTENT
                continue
            if self._mode == _REASONING:
                i = self._buf.find(THINK_CLOSE)
                if i >= 0:
                    reasoning.append(self._buf[:i])
                    self._buf = self._buf[i + len(THINK_CLOSE):]
                    self._mode = _CONTENT
                    continue
                hold = _partial_suffix(self._buf, THINK_CLOSE)
                reasoning.append(self._buf[:len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold:]
                break
            content.append(self._buf)
            self._buf = ""
            break
        return DeltaSplit("".join(reasoning), "".join(content))

    def flush(self) -> DeltaSplit:
        """End of output: whatever was held back is decided by the current state."""
        held, self._buf = self._buf, ""
        if self._mode in (_REASONING_START, _REASONING):
            return DeltaSplit(reasoning=held)
        return DeltaSplit(content=held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def prompt_opens_reasoning(prompt_text: str | None) -> bool:
    """True when the rendered prompt ends inside an open `<think>` (the template opened it)."""
    return bool(prompt_text) and prompt_text.rstrip().endswith(THINK_OPEN)


ParserFactory = Callable[[bool], ReasoningParser]  # (prompt opened <think>) -> parser

_PARSERS: dict[str, ParserFactory] = {
    "think": lambda opened: ThinkReasoningParser(start_in_reasoning=opened),
    # DeepSeek-R1's outputs start inside reasoning whatever the template did.
    "deepseek_r1": lambda opened: ThinkReasoningParser(start_in_reasoning=True),
}


def get_reasoning_parser(name: str) -> ParserFactory:
    """The parser factory registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known parsers: {', '.join(sorted(_PARSERS))}") from None


def known_reasoning_parsers() -> list[str]:
    return sorted(_PARSERS)
