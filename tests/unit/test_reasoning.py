"""Reasoning parsers: one-shot splits, and streaming splits at every cut point agree with them."""
from __future__ import annotations

import itertools

import pytest

from cluster.router.reasoning import (ErnieReasoningParser, ReasoningSplit, ThinkReasoningParser,
                                      get_reasoning_parser, known_reasoning_parsers, prompt_opens_reasoning)

# (text, start_in_reasoning, expected reasoning, expected content)
CASES = [
    ("The answer is 4.", False, None, "The answer is 4."),
    ("", False, None, ""),
    ("  \n", False, None, "  \n"),
    ("<think>2+2 is 4</think>The answer is 4.", False, "2+2 is 4", "The answer is 4."),
    ("\n <think>a</think>\n\nb", False, "a", "\n\nb"),
    ("<think>still thinking", False, "still thinking", ""),
    ("<think></think>", False, "", ""),
    ("<think>x</thi", False, "x</thi", ""),
    ("<think>a </b> c</think>d</think>e", False, "a </b> c", "d</think>e"),
    ("Answer: <think>not reasoning</think>", False, None, "Answer: <think>not reasoning</think>"),
    ("<thinking>no</thinking>", False, None, "<thinking>no</thinking>"),
    ("<thi", False, None, "<thi"),
    # The prompt opened <think>: output starts inside reasoning.
    ("2+2 is 4</think>The answer is 4.", True, "2+2 is 4", "The answer is 4."),
    ("\nstill thinking", True, "\nstill thinking", ""),
    ("<think>a</think>b", True, "a", "b"),
    ("  <thi", True, "  <thi", ""),
    ("", True, "", ""),
    ("</think>", True, "", ""),
]


def _stream(parser: ThinkReasoningParser, pieces: list[str]) -> ReasoningSplit:
    reasoning, content = [], []
    for piece in pieces:
        d = parser.feed(piece)
        reasoning.append(d.reasoning)
        content.append(d.content)
    d = parser.flush()
    reasoning.append(d.reasoning)
    content.append(d.content)
    return ReasoningSplit("".join(reasoning) if parser.saw_reasoning else None, "".join(content))


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_one_shot(text, opened, reasoning, content):
    assert ThinkReasoningParser(opened).parse(text) == ReasoningSplit(reasoning, content)


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_streaming_matches_one_shot_at_every_cut(text, opened, reasoning, content):
    expected = ReasoningSplit(reasoning, content)
    assert _stream(ThinkReasoningParser(opened), [text]) == expected
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert _stream(ThinkReasoningParser(opened), [text[:i], text[i:j], text[j:]]) == expected, (i, j)
    assert _stream(ThinkReasoningParser(opened), list(text)) == expected


def test_streaming_releases_text_as_soon_as_it_is_decided():
    p = ThinkReasoningParser()
    assert p.feed("<th").content == "" and p.feed("ink>ab</").reasoning == "ab"
    d = p.feed("think>Hi")
    assert (d.reasoning, d.content) == ("", "Hi")
    plain = ThinkReasoningParser()
    assert plain.feed("Hello").content == "Hello"  # not a tag prefix: nothing held back


def test_registry():
    assert set(known_reasoning_parsers()) >= {"think", "deepseek_r1"}
    assert get_reasoning_parser("think")(False).parse("<think>a</think>b") == ReasoningSplit("a", "b")
    assert get_reasoning_parser("think")(True).parse("a</think>b") == ReasoningSplit("a", "b")
    assert get_reasoning_parser("deepseek_r1")(False).parse("a</think>b") == ReasoningSplit("a", "b")
    assert get_reasoning_parser("qwen3")(True).parse("a</think>b") == ReasoningSplit("a", "b")
    assert get_reasoning_parser("ernie-45-vl")(True).parse("a\n</think>\n\n<response>\nb\n</response>\n") == \
        ReasoningSplit("a\n", "b")
    with pytest.raises(ValueError, match="known parsers: deepseek_r1, ernie-45-vl, ernie45, qwen3, think"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize("prompt,opened", [
    ("<|im_start|>assistant\n<think>\n", True),
    ("<|im_start|>assistant\n", False),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    (None, False),
])
def test_prompt_opens_reasoning(prompt, opened):
    assert prompt_opens_reasoning(prompt) is opened


# ERNIE-4.5's output: (text, start_in_reasoning, reasoning, content)
ERNIE_CASES = [
    ("abc\n</think>\n\n<response>\ndef\n</response>\n", True, "abc\n", "def"),
    ("abc\n</think>\ndef", True, "abc\n", "\ndef"),
    ("<think>a</think><response>b</response>", False, "a", "b"),
    ("<response>\nonly an answer\n</response>", False, None, "only an answer"),
    ("<response>\nunfinished", False, None, "unfinished"),
    ("<response>", False, None, ""),
    ("  <resp", False, None, "  <resp"),
    ("<response>x</response> tail", False, None, "x tail"),
    ("x <response>y</response>", False, None, "x <response>y</response>"),
    ("a</think><response>\nline\n\n</response>", True, "a", "line\n"),
    ("<response>a</resp", False, None, "a</resp"),
]


@pytest.mark.parametrize("text,opened,reasoning,content", ERNIE_CASES)
def test_ernie_parser_streams_as_it_parses(text, opened, reasoning, content):
    expected = ReasoningSplit(reasoning, content)
    assert ErnieReasoningParser(opened).parse(text) == expected
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert _stream(ErnieReasoningParser(opened), [text[:i], text[i:j], text[j:]]) == expected, (i, j)
    assert _stream(ErnieReasoningParser(opened), list(text)) == expected
