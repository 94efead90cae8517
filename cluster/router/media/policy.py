"""MediaSettings: whether multimodal input is on, how many items a prompt may carry, and the caps
and allow-lists that bound fetching and decoding them (vLLM's flag names where vLLM has one).

Pure pydantic (no PIL, no httpx): cluster/config.py and the router's settings import it.
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODALITIES = ("image", "video")
DEFAULT_MAX_IMAGE_BYTES = 20 << 20
DEFAULT_MAX_IMAGE_PIXELS = 1 << 25  # 32 Mpx: a 6000x5000 photo fits; PIL's own bomb warning is at ~89 Mpx
DEFAULT_MAX_MM_BODY_BYTES = 64 << 20  # a few base64 images; the text cap is RouterSettings.max_body_bytes


class MediaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enable_mm: bool | None = Field(None, description="accept image content parts in chat requests (--enable-mm); "
                                   "None: on exactly when the model is a vision model; false: refused with 400")
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 10, "video": 0},
        description="most items of each modality per request, e.g. {\"image\": 10}; a modality not named "
                    "allows none. Video is accepted here but refused per request (no video decoder)")
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, gt=0, description="most bytes of one encoded image "
                                 "(a data URL's decoded payload, a fetched body, a local file); over it: 413")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="most width*height of one image, "
                                  "checked from its header before decoding; over it: 413")
    max_image_aspect_ratio: float = Field(200.0, ge=1.0, description="longer side / shorter side above which an "
                                          "image is refused (Qwen's processors refuse beyond 200)")
    media_fetch_timeout_s: float = Field(10.0, gt=0, description="connect and read timeout of an image URL, and "
                                         "the deadline of the whole fetch (every redirect and the body)")
    max_media_redirects: int = Field(3, ge=0, description="redirects followed per image URL (each hop re-checked)")
    allowed_media_domains: tuple[str, ...] = Field(
        (), description="as vLLM's --allowed-media-domains: when set, only these host names are fetched; they "
                        "are trusted, so they may resolve to private or loopback addresses. Empty: any host "
                        "whose addresses are all public")
    allowed_local_media_path: str | None = Field(
        None, description="folder whose files file:// URLs (or absolute paths) may name, as vLLM's "
                          "--allowed-local-media-path; None: local files are refused")
    max_mm_body_bytes: int = Field(DEFAULT_MAX_MM_BODY_BYTES, gt=0, description="request-body cap of chat "
                                   "requests when multimodal input is on (the text cap stays for the others)")

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _limits(cls, limits: dict[str, int]) -> dict[str, int]:
        for name, n in limits.items():
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r} in limit_mm_per_prompt; known: {', '.join(MODALITIES)}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"limit_mm_per_prompt[{name!r}] must be a non-negative integer, got {n!r}")
        return limits

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _domains(cls, domains: Any) -> Any:
        if isinstance(domains, str):
            domains = [d for d in domains.split(",")]
        out = []
        for d in domains or ():
            if not isinstance(d, str):
                raise ValueError(f"allowed_media_domains holds host names, got {d!r}")
            host = d.strip().lower().rstrip(".")
            if not host or any(c in host for c in "/:@ ") and not _is_ipv6(host):
                raise ValueError(f"allowed_media_domains holds bare host names (no scheme, port or path), got {d!r}")
            out.append(host.strip("[]"))
        return tuple(out)

    @field_validator("allowed_local_media_path")
    @classmethod
    def _local_path(cls, path: str | None) -> str | None:
        if path is not None and not PurePath(path).is_absolute():
            raise ValueError(f"allowed_local_media_path must be an absolute folder, got {path!r}")
        return path

    def limit(self, modality: str) -> int:
        return self.limit_mm_per_prompt.get(modality, 0)


def _is_ipv6(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False
