"""Incremental detokenization and stop-string matching for one request.

Decoding only the last few tokens keeps each step O(1); text is held back while it ends in an
incomplete UTF-8 sequence (U+FFFD), so multi-byte characters never arrive split.
"""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Start from a few prompt tokens so the first output token gets its leading space right.
        self.tokens: list[int] = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly readable text (possibly empty)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return full[len(prefix) :]
        return ""


def find_stop(text: str, new_len: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `new_len` chars: (start index, stop)."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    window_start = max(0, len(text) - new_len - longest + 1)
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, window_start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
