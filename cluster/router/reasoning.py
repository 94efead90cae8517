"""Reasoning parsers: split `<think>reasoning</think>content` into reasoning_content and content
(`think`, `qwen3`, `deepseek_r1`; `ernie-45-vl`/`ernie45` also drop ERNIE's `<response>` wrapper).

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


RESPONSE_OPEN = "<response>"
RESPONSE_CLOSE = "</response>"


def unwrap_response(content: str) -> str:
    """ERNIE-4.5's answer without its optional `<response>\n...\n</response>` wrapper (the
    newline inside each tag goes with it; whitespace after the close is dropped). Content that
    does not start (after whitespace) with `<response>` is returned as it is."""
    stripped = content.lstrip()
    if not stripped.startswith(RESPONSE_OPEN):
        return content
    body = stripped[len(RESPONSE_OPEN):]
    body = body[1:] if body.startswith("\n") else body
    inner, closed, rest = body.partition(RESPONSE_CLOSE)
    if not closed:
        return body
    inner = inner[:-1] if inner.endswith("\n") else inner
    return inner + (rest if rest.strip() else "")


_U_START, _U_BODY, _U_AFTER, _U_PLAIN = range(4)


class _ResponseUnwrap:
    """`unwrap_response` for streamed content: holds back only what may still be part of a tag."""

    def __init__(self) -> None:
        self._mode = _U_START
        self._buf = ""

    def feed(self, text: str) -> str:
        self._buf += text
        out = []
        while True:
            if self._mode == _U_START:
                stripped = self._buf.lstrip()
                if stripped.startswith(RESPONSE_OPEN):
                    if len(stripped) == len(RESPONSE_OPEN):
                        break  # the newline after the tag, if any, is not here yet
                    body = stripped[len(RESPONSE_OPEN):]
                    self._buf = body[1:] if body.startswith("\n") else body
                    self._mode = _U_BODY
                    continue
                if RESPONSE_OPEN.startswith(stripped):
                    break  # undecided
                self._mode = _U_PLAIN
                continue
            if self._mode == _U_BODY:
                i = self._buf.find(RESPONSE_CLOSE)
                if i >= 0:
                    inner = self._buf[:i]
                    out.append(inner[:-1] if inner.endswith("\n") else inner)
                    self._buf = self._buf[i + len(RESPONSE_CLOSE):]
                    self._mode = _U_AFTER
                    continue
                hold = max(_partial_suffix(self._buf, "\n" + RESPONSE_CLOSE), _partial_suffix(self._buf, RESPONSE_CLOSE))
                out.append(self._buf[:len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold:]
                break
            if self._mode == _U_AFTER:
                if not self._buf.strip():
                    break  # whitespace after the close: dropped unless text follows
                self._mode = _U_PLAIN
            out.append(self._buf)
            self._buf = ""
            break
        return "".join(out)

    def flush(self) -> str:
        held, self._buf = self._buf, ""
        if self._mode == _U_START:
            return unwrap_response(held)
        return "" if self._mode == _U_AFTER else held


class ErnieReasoningParser:
    """ERNIE-4.5 (and ERNIE-4.5-VL) thinking output: reasoning up to `</think>` (the chat template
    opens `<think>` when thinking is on), then the answer, optionally wrapped in
    `<response>...</response>`, which is dropped (FastDeploy's `ernie-45-vl`, vLLM's `ernie45`)."""

    def __init__(self, start_in_reasoning: bool = False) -> None:
        self._think = ThinkReasoningParser(start_in_reasoning)
        self._unwrap = _ResponseUnwrap()

    @property
    def saw_reasoning(self) -> bool:
        return self._think.saw_reasoning

    def parse(self, text: str) -> ReasoningSplit:
        split = ThinkReasoningParser(self._think.start_in_reasoning).parse(text)
        return ReasoningSplit(split.reasoning, unwrap_response(split.content))

    def feed(self, text: str) -> DeltaSplit:
        d = self._think.feed(text)
        return DeltaSplit(d.reasoning, self._unwrap.feed(d.content))

    def flush(self) -> DeltaSplit:
        d = self._think.flush()
        return DeltaSplit(d.reasoning, self._unwrap.feed(d.content) + self._unwrap.flush())


ParserFactory = Callable[[bool], ReasoningParser]  # (prompt opened <think>) -> parser

_PARSERS: dict[str, ParserFactory] = {
    "think": lambda opened: ThinkReasoningParser(start_in_reasoning=opened),
    "qwen3": lambda opened: ThinkReasoningParser(start_in_reasoning=opened),  # vLLM's name for the same split
    "ernie-45-vl": lambda opened: ErnieReasoningParser(start_in_reasoning=opened),  # FastDeploy's name
    "ernie45": lambda opened: ErnieReasoningParser(start_in_reasoning=opened),  # vLLM's name
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
