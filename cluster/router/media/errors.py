"""Why a media item was refused: one exception class per cause, each carrying the HTTP status and
OpenAI error type the router answers with (the app's PdserveError handler sends them as they are).

Messages name what the client sent and the limit it broke, never what the router found out on its
own (resolved addresses, local paths outside the allowed folder, upstream error bodies).
"""
from __future__ import annotations

from cluster.errors import InvalidRequestError


class MediaError(InvalidRequestError):
    """Base: 400 invalid_request_error, param "messages"."""

    code = "invalid_media"

    def __init__(self, message: str, *, param: str | None = "messages", code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class MediaDisabledError(MediaError):
    """An image part while multimodal input is off."""

    code = "multimodal_disabled"


class UnsupportedMediaError(MediaError):
    """A URL scheme, data-URL encoding, media type, image format or modality (video) not accepted."""

    code = "unsupported_media"


class TooManyMediaError(MediaError):
    """More items of a modality than limit_mm_per_prompt allows."""

    code = "too_many_media_items"


class MediaFetchError(MediaError):
    """An http(s) URL that could not be fetched (unreachable, bad status, too many redirects)."""

    code = "media_fetch_failed"


class MediaTimeoutError(MediaFetchError):
    code = "media_fetch_timeout"


class RefusedAddressError(MediaError):
    """A URL whose host is (or resolves to) a private, loopback, link-local, multicast or reserved
    address, or is outside allowed_media_domains; or a local path outside allowed_local_media_path."""

    code = "media_address_refused"


class MediaTooLargeError(MediaError):
    """Over max_image_bytes or max_image_pixels: 413."""

    status = 413
    code = "media_too_large"


class ImageDecodeError(MediaError):
    """Bytes that do not decode to an image (undecodable, truncated, corrupt)."""

    code = "invalid_image"


class ImageShapeError(MediaError):
    """An image whose aspect ratio is beyond max_image_aspect_ratio."""

    code = "invalid_image_shape"
