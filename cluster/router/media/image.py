"""Decoding an image's bytes safely, and naming it by content.

`decode_image(data, ...)` reads the header first (format, width, height) and refuses an image
over the pixel cap or beyond the aspect-ratio limit before any pixel is decoded; then it decodes
fully (a truncated or corrupt file fails here, not on a worker) and converts to RGB the way
transformers' processors do (transparency composited onto white). Only the formats in
`IMAGE_FORMATS` are tried, so PIL never hands a request to a decoder outside that list (EPS, for
one, runs Ghostscript).

`LoadedImage` keeps the encoded bytes as they came: they are what workers receive (compact), and
their sha256 names the image. `mm_hash` (pdcommon's, the engine's too) mixes the processor options
in, so the same image under other options never shares an encoder-cache entry or a KV block.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.router.media.errors import ImageDecodeError, ImageShapeError, MediaTooLargeError
from pdcommon.mm_hash import mm_hash

# PIL format names; MPO is the multi-picture JPEG phones write.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class LoadedImage:
    """One verified image: its encoded bytes (what is sent to workers), PIL format name, size and
    sha256 of the bytes (hex)."""

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int
    sha256: str

    def mm_hash(self, processor_kwargs: Mapping[str, Any] | None = None) -> int:
        return mm_hash(self.data, processor_kwargs)


def decode_image(data: bytes, *, max_pixels: int, max_aspect_ratio: float) -> tuple[LoadedImage, Any]:
    """(LoadedImage, the decoded RGB PIL image); a MediaError subclass when refused (see the module
    docstring). CPU-bound: async callers run it in a thread."""
    from PIL import Image

    if not data:
        raise ImageDecodeError("the image is empty")
    with warnings.catch_warnings():
        # Our pixel cap decides; PIL's DecompressionBombWarning (and its error at 2x) must not leak out.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise MediaTooLargeError(f"the image has more than {max_pixels} pixels") from None
        except Exception:  # noqa: BLE001 - PIL raises several types for bad data
            raise ImageDecodeError(f"cannot decode the image: not a supported format ({', '.join(IMAGE_FORMATS)}) "
                                   "or corrupt") from None
        fmt, (width, height) = img.format or "", img.size
        check_size(width, height, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
        try:
            img.verify()  # structure and checksums (PNG CRCs); the image must be reopened after it
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            img.seek(0)  # animated GIF/WebP: the first frame
            img.load()  # every pixel: truncated data fails here
            rgb = to_rgb(img)
        except Exception:  # noqa: BLE001
            raise ImageDecodeError("cannot decode the image: the file is truncated or corrupt") from None
    return LoadedImage(data=bytes(data), format=fmt, width=width, height=height,
                       sha256=hashlib.sha256(data).hexdigest()), rgb


def check_size(width: int, height: int, *, max_pixels: int, max_aspect_ratio: float) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise MediaTooLargeError(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                 f"{max_pixels} pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageShapeError(f"the image is {width}x{height}: its aspect ratio {ratio:.1f} is over the limit "
                              f"of {max_aspect_ratio:g}")


def to_rgb(img: Any) -> Any:
    """RGB as transformers' `convert_to_rgb` makes it: images with transparency over white."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
