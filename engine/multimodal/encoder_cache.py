"""The vision encoder's output per image, kept by content hash so that a prompt prefilled in
chunks, a partial prefix hit or a repeated image slices it instead of encoding again."""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """LRU of [num_tokens, hidden] embeddings under a byte budget. An entry larger than the
    budget is still returned to its caller, just not kept."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"encoder cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.encoded_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        """Whether `key` is cached (no hit counted, no LRU move: the scheduler asks this)."""
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def get(self, key: int) -> torch.Tensor | None:
        t = self._entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: int, value: torch.Tensor) -> None:
        self.encoded_tokens += value.shape[0]
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = value
        self._bytes += size
