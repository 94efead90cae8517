"""Images in (PIL images, encoded bytes, file paths, data URLs) -> processed pixels, patch grid and
content hash, and the prompt's placeholder runs expanded to each image's token count.

Pixels are made where the prompt is prefilled (this engine), from the image's compact bytes:
the processed float32 patches are ~25x larger than a PNG, so they never cross the network.
The preprocessing itself is the checkpoint's own image processor (transformers'), so the pixels
are exactly those its reference model sees.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from engine.multimodal.items import MultiModalItem
from pdcommon.mm_hash import mm_hash
from pdcommon.vision import geometry_options, placeholder_runs

_PROCESSOR_CLASSES = {
    "Ernie4_5_VLMoeForConditionalGeneration": "Ernie4_5_VLMoeImageProcessorPil",
    "Ernie4_5_VL_MoeForConditionalGeneration": "Ernie4_5_VLMoeImageProcessorPil",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2VLImageProcessorPil",
}


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [patches, channels * patch * patch] float32
    grid_thw: tuple[int, int, int]
    content_hash: int


def load_image(image: Any) -> tuple[Any, bytes]:
    """(RGB PIL image, the bytes its content hash covers) from a PIL image, encoded bytes, a local
    path or a `data:` URL. Undecodable input is a ValueError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        return rgb, f"{rgb.size[0]}x{rgb.size[1]}:".encode() + rgb.tobytes()
    if isinstance(image, (str, Path)):
        s = str(image)
        if s.startswith(("http://", "https://")):
            raise ValueError("http(s) image URLs are fetched by the server's router; offline, pass a local path, "
                             "bytes, a data URL or a PIL image")
        if s.startswith("data:"):
            try:
                data = base64.b64decode(s.split(",", 1)[1], validate=True)
            except (IndexError, ValueError) as e:
                raise ValueError(f"bad data URL: {e}") from None
        else:
            p = Path(s)
            if not p.is_file():
                raise ValueError(f"image file {s!r} does not exist")
            data = p.read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        raise ValueError(f"an image must be a PIL image, bytes, a path or a data URL, not {type(image).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB"), data
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode the image: {e}") from None


class ImageProcessor:
    """The checkpoint's image processor (its preprocessor_config.json, else the architecture's
    defaults) with the request-independent `processor_kwargs` (e.g. min_pixels / max_pixels)."""

    def __init__(self, model_path: str, architecture: str, processor_kwargs: Mapping[str, Any] | None = None) -> None:
        import transformers

        self.kwargs = dict(processor_kwargs or {})
        # The size options go in as transformers' `size` (its constructors ignore a bare
        # min_pixels/max_pixels); the rest as given. pdcommon.vision reads the same options.
        sizing = geometry_options(self.kwargs)
        rest = {k: v for k, v in self.kwargs.items() if k not in ("min_pixels", "max_pixels", "size")}
        if (Path(model_path) / "preprocessor_config.json").is_file():
            self._proc = transformers.AutoImageProcessor.from_pretrained(model_path, **rest)
        else:
            name = _PROCESSOR_CLASSES.get(architecture)
            if name is None:
                raise ValueError(f"no image processor is known for {architecture!r}")
            self._proc = getattr(transformers, name)(**rest)
        size = dict(self._proc.size.items()) if hasattr(self._proc.size, "items") else dict(vars(self._proc.size))
        if "min_pixels" in sizing:
            size["shortest_edge"] = sizing["min_pixels"]
        if "max_pixels" in sizing:
            size["longest_edge"] = sizing["max_pixels"]
        self._size = {k: size[k] for k in ("shortest_edge", "longest_edge") if size.get(k) is not None}

    def __call__(self, image: Any) -> ProcessedImage:
        rgb, data = load_image(image)
        try:
            out = self._proc(images=[rgb], return_tensors="pt", size=self._size)
        except ValueError as e:  # e.g. an extreme aspect ratio
            raise ValueError(f"image {rgb.size[0]}x{rgb.size[1]} cannot be processed: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
        return ProcessedImage(out["pixel_values"].float(), grid, mm_hash(data, self.kwargs))  # type: ignore[arg-type]


def expand_placeholders(token_ids: Sequence[int], placeholder_id: int, images: Sequence[ProcessedImage],
                        tokens_per_image: Sequence[int]) -> tuple[list[int], tuple[MultiModalItem, ...]]:
    """Replace the i-th run of `placeholder_id` in the prompt by image i's run of tokens; returns
    the new token ids and the items (offsets in the new ids). The run count must equal the image
    count, and each run is one token or already the image's length."""
    runs = placeholder_runs(token_ids, placeholder_id)
    if len(runs) != len(images):
        raise ValueError(f"the prompt has {len(runs)} image placeholder(s) (token {placeholder_id}) "
                         f"but {len(images)} image(s) were given")
    out: list[int] = []
    items = []
    last = 0
    for k, ((start, end), img, n) in enumerate(zip(runs, images, tokens_per_image)):
        # A run is one placeholder (the template's) or already the image's whole run (a router's).
        if end - start not in (1, n):
            raise ValueError(f"image {k}: the prompt holds {end - start} placeholder tokens for it, but it takes "
                             f"{n} tokens ({img.grid_thw[1]}x{img.grid_thw[2]} patches): the router and this worker "
                             "disagree on the model or its mm_processor_kwargs")
        out.extend(token_ids[last:start])
        items.append(MultiModalItem("image", len(out), n, img.grid_thw, img.content_hash, img.pixel_values))
        out.extend([placeholder_id] * n)
        last = end
    out.extend(token_ids[last:])
    return out, tuple(items)
