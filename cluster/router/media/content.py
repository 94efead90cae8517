"""A chat request's media parts: found in order, counted against the limits, loaded.

The seam for wiring is `load_chat_media(messages, settings, loader) -> ChatMedia`: the messages as
a multimodal chat template wants them (each image part replaced in place by `{"type": "image"}`,
text parts kept, text-only messages exactly as the text path renders them) and the loaded images
in prompt order with their content hashes. Everything that can be refused is refused before any
byte is fetched (a modality off or over its limit, video, unknown part types); then the images
load concurrently, and the first refusal wins.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.router.media.errors import MediaDisabledError, MediaError, TooManyMediaError, UnsupportedMediaError
from cluster.router.media.fetch import MediaLoader
from cluster.router.media.image import LoadedImage, mm_hash
from cluster.router.media.policy import MediaSettings
from cluster.router.openai import ChatMessage, ContentPart

IMAGE_PART = "image_url"
VIDEO_PART = "video_url"


@dataclass(frozen=True)
class MediaPart:
    modality: str  # "image"
    url: str
    message_index: int
    part_index: int


@dataclass(frozen=True)
class ChatMedia:
    messages: list[dict[str, Any]]  # for the chat template; image parts are {"type": "image"}
    images: tuple[LoadedImage, ...]  # in prompt order, one per {"type": "image"} part
    hashes: tuple[int, ...]  # mm_hash(image bytes, mm_processor_kwargs) of each image


def has_media(messages: Sequence[ChatMessage]) -> bool:
    """True when any message has a content part that is not text (the text path refuses those)."""
    return any(isinstance(m.content, list) and any(p.type != "text" for p in m.content) for m in messages)


def collect_media_parts(messages: Sequence[ChatMessage], settings: MediaSettings) -> list[MediaPart]:
    """The image parts in prompt order; MediaError for parts the settings refuse (see the module)."""
    parts: list[MediaPart] = []
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if part.type == "text":
                continue
            if part.type == VIDEO_PART:
                raise UnsupportedMediaError("video input is not supported: no video decoder is installed "
                                            "(send the frames as images)")
            if part.type != IMAGE_PART:
                raise UnsupportedMediaError(f"content part of type {part.type!r} is not supported: only text and "
                                            "image_url parts are")
            if not settings.enable_mm:
                raise MediaDisabledError("image input is off on this server: it takes images when it serves a "
                                         "vision model (and --enable-mm is not false)")
            parts.append(MediaPart("image", _image_url(part, i, j), i, j))
    limit = settings.limit("image")
    if len(parts) > limit:
        raise TooManyMediaError(f"this request has {len(parts)} images; the limit is {limit} per prompt "
                                f"(--limit-mm-per-prompt '{{\"image\": {limit}}}')")
    return parts


def _image_url(part: ContentPart, i: int, j: int) -> str:
    value = (part.model_extra or {}).get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise MediaError(f"messages[{i}].content[{j}]: an image_url part needs image_url.url (a string)")
    return url


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for a multimodal chat template: content lists with image parts as {"type": "image"};
    messages without media parts as the text path gives them (content as one string)."""
    out = []
    for m in messages:
        base = m.model_dump(exclude_none=True)
        if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
            base["content"] = [{"type": "text", "text": p.text or ""} if p.type == "text" else {"type": "image"}
                               for p in m.content]
        else:
            base["content"] = m.text() or ""
        out.append(base)
    return out


async def load_chat_media(messages: Sequence[ChatMessage], settings: MediaSettings,
                          loader: MediaLoader | None = None,
                          processor_kwargs: Mapping[str, Any] | None = None) -> ChatMedia:
    """The seam: template messages + loaded images (see the module docstring); each image's hash
    mixes in `processor_kwargs` (the engine's mm_processor_kwargs)."""
    parts = collect_media_parts(messages, settings)
    loader = loader or MediaLoader(settings)
    images: list[LoadedImage] = []
    if parts:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(loader.load_image(p.url)) for p in parts]
        except* MediaError as eg:
            raise eg.exceptions[0] from None
        images = [t.result() for t in tasks]
    kwargs = processor_kwargs or {}
    return ChatMedia(messages=template_messages(messages), images=tuple(images),
                     hashes=tuple(mm_hash(img.data, kwargs) for img in images))
