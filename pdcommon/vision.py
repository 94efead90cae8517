"""How many tokens an image becomes, from its width and height alone (torch-free).

The router needs the count before any worker sees the image: usage, the context-length check,
`/tokenize` and the prefix index all count an image's tokens, and the prompt it sends holds each
image's whole run of placeholder tokens. The pixels themselves are made on the prefill worker by
the checkpoint's own (transformers') image processor; `ImageGeometry` is the same resize rule
written in plain Python, and a test holds the two equal over many sizes and options.

`VisionInfo.from_folder` reads a model folder's config.json and preprocessor_config.json; it is
None for a text-only model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures whose images are resized by the "smart resize" rule (multiple of patch * merge,
# pixel count clamped to [min_pixels, max_pixels], aspect ratio kept), with their processors' defaults
# (Ernie4_5_VLMoeImageProcessorPil, Qwen2VLImageProcessorPil).
_DEFAULTS: dict[str, dict[str, int]] = {
    "Ernie4_5_VLMoeForConditionalGeneration": dict(patch_size=14, merge_size=2, temporal_patch_size=1,
                                                   min_pixels=56 * 56, max_pixels=28 * 28 * 6177,
                                                   image_token_id=100295),
    "Qwen2_5_VLForConditionalGeneration": dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                                               image_token_id=151655),
}
_DEFAULTS["Ernie4_5_VL_MoeForConditionalGeneration"] = _DEFAULTS["Ernie4_5_VLMoeForConditionalGeneration"]
MAX_ASPECT_RATIO = 200.0  # the processors refuse beyond it


@dataclass(frozen=True)
class ImageGeometry:
    """The resize rule of a smart-resize image processor.

    `temporal_patch_size`: frames per vision patch (Qwen2.5-VL: 2). A still image is one temporal
    patch, its frame repeated: it widens each patch's pixel row, never the grid or the token count."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    temporal_patch_size: int = 1

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.merge_size < 1 or self.temporal_patch_size < 1:
            raise ValueError(f"patch_size, merge_size and temporal_patch_size must be positive, got "
                             f"{self.patch_size}, {self.merge_size}, {self.temporal_patch_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the processor resizes a width x height image to; ValueError beyond the
        aspect-ratio limit."""
        if width < 1 or height < 1:
            raise ValueError(f"an image needs pixels, got {width}x{height}")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ValueError(f"the image is {width}x{height}: its aspect ratio is over {MAX_ASPECT_RATIO:g}")
        f = self.factor
        h, w = round(height / f) * f, round(width / f) * f
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h, w

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(temporal, height, width) in vision patches; temporal is 1 for an image."""
        h, w = self.resized(width, height)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, width: int, height: int) -> int:
        """The image's placeholder tokens in the prompt (one per merge x merge group of patches)."""
        t, gh, gw = self.grid(width, height)
        return t * (gh // self.merge_size) * (gw // self.merge_size)


def placeholder_runs(token_ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """The [start, end) runs of `token` in `token_ids`, in order: one per image in a prompt."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(token_ids)
    while i < n:
        if token_ids[i] != token:
            i += 1
            continue
        j = i
        while j < n and token_ids[j] == token:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def geometry_options(processor_kwargs: Mapping[str, Any] | None) -> dict[str, int]:
    """The options of `processor_kwargs` that shape an image's patches: `min_pixels`/`max_pixels` (as
    vLLM's users pass them), `size` ({"shortest_edge", "longest_edge"}, as transformers names them),
    `patch_size`, `merge_size` and `temporal_patch_size` (which leaves the grid alone). Bad values
    are a ValueError."""
    out: dict[str, int] = {}
    kwargs = dict(processor_kwargs or {})
    size = kwargs.get("size")
    if size is not None:
        if not isinstance(size, Mapping) or not set(size) <= {"shortest_edge", "longest_edge", "min_pixels",
                                                              "max_pixels"}:
            raise ValueError(f"mm_processor_kwargs size must be {{'shortest_edge': ..., 'longest_edge': ...}}, got {size!r}")
        kwargs.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        kwargs.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    for key in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
        value = kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mm_processor_kwargs {key} must be a positive integer, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class VisionInfo:
    """A vision model as the router sees it: its placeholder token, the resize rule, and the
    processor options every image's content hash mixes in."""

    architecture: str
    image_token_id: int
    geometry: ImageGeometry
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path, processor_kwargs: Mapping[str, Any] | None = None) -> "VisionInfo | None":
        folder = Path(folder)
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        arch = next((a for a in hf.get("architectures") or [] if a in _DEFAULTS), None)
        if arch is None:
            return None
        defaults = dict(_DEFAULTS[arch])
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            defaults.update(geometry_options(json.loads(pre.read_text(encoding="utf-8"))))
        defaults.update(geometry_options(processor_kwargs))
        token = int(hf.get("image_token_id", defaults.pop("image_token_id")))
        defaults.pop("image_token_id", None)
        return cls(arch, token, ImageGeometry(**defaults), dict(processor_kwargs or {}))
