"""What a request carries for each image: where its placeholder tokens are, its patch grid, a
content hash, and the processed pixels (until the encoder has run)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MultiModalItem:
    """One image in a prompt. `offset`/`length`: its run of placeholder tokens in the prompt's
    token ids; `grid_thw`: (temporal, height, width) in vision patches; `content_hash`: 63-bit
    hash of the image bytes and the processor options (what the prefix cache and the encoder
    cache key on); `pixel_values`: [patches, channels * patch * patch] float32. Both None where only
    the KV moves (a decode worker never needs the pixels)."""

    modality: str
    offset: int
    length: int
    grid_thw: tuple[int, int, int] | None
    content_hash: int
    pixel_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.modality != "image":
            raise ValueError(f"modality {self.modality!r} is not supported (only 'image')")
        if self.offset < 0 or self.length < 1:
            raise ValueError(f"bad placeholder span: offset {self.offset}, length {self.length}")

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def span(self) -> tuple[int, int, int]:
        """(offset, length, content hash): what block hashes mix in."""
        return (self.offset, self.length, self.content_hash)


@dataclass(frozen=True)
class MRopePositions:
    """Multimodal rotary positions of a prompt: `positions` [3, prompt_len] (temporal, height,
    width; equal for text tokens), and `delta`, what a token after the prompt adds to its index
    (decode continues at index + delta on all three axes). A decode worker that received the
    prompt's KV knows only `delta` (positions None): it never computes a prompt token."""

    positions: torch.Tensor | None
    delta: int


@dataclass(frozen=True)
class StepMultiModal:
    """A step's multimodal inputs, built by the model runner: image embeddings for the
    placeholder rows in the flat batch, [3, T] rotary positions (None when every row's axes
    agree), and the rows whose tokens take the vision experts (None: none)."""

    embed_rows: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    vision_rows: torch.Tensor | None = None
