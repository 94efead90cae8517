"""A chat request with images -> its prompt: the template rendered over the messages (each image
part as the template's image placeholder), tokenized, and each image's single placeholder grown
into the run of tokens that image becomes (pdcommon.vision: the count from its width and height).

The router does the counting so that usage, the context-length check, `/tokenize` and the
prefix index see the prompt the model computes; the prefill worker makes the pixels from the
bytes and refuses a prompt whose runs do not match its own count (routers and workers must then
disagree on the model or its mm_processor_kwargs).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.router.backend import PromptImage
from cluster.router.media.content import load_chat_media
from cluster.router.media.errors import ImageShapeError, MediaError
from cluster.router.media.image import LoadedImage
from cluster.router.openai import ChatMessage
from cluster.router.serving import Prompt, RouterState, render_chat
from pdcommon.vision import VisionInfo, placeholder_runs


async def multimodal_chat_prompt(state: RouterState, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                                 continue_final_message: bool, template_kwargs: dict[str, Any] | None) -> Prompt:
    """The prompt of a chat request that has image parts (MediaError when they are refused)."""
    vision = state.backend.model.vision
    kwargs = vision.processor_kwargs if vision is not None else {}
    media = await load_chat_media(messages, state.media, state.media_loader, kwargs)
    tokenizer = state.backend.model.tokenizer
    text = render_chat(tokenizer, media.messages, add_generation_prompt, continue_final_message, template_kwargs)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if vision is None:  # enable_mm is only on for a vision model; media.images is empty otherwise
        return Prompt(tuple(ids), text)
    token_ids, images = expand_image_runs(ids, vision, media.images, media.hashes)
    return Prompt(tuple(token_ids), text, images)


def expand_image_runs(ids: Sequence[int], vision: VisionInfo, images: Sequence[LoadedImage],
                      hashes: Sequence[int]) -> tuple[list[int], tuple[PromptImage, ...]]:
    """Each run of the image placeholder token in `ids` (one per image, in order) made as long as
    its image's tokens."""
    runs = placeholder_runs(ids, vision.image_token_id)
    if len(runs) != len(images):
        raise MediaError(f"the chat template rendered {len(runs)} image placeholder(s) for {len(images)} image(s): "
                         "this model's template does not take image parts this way")
    out: list[int] = []
    placed: list[PromptImage] = []
    last = 0
    for (start, end), img, h in zip(runs, images, hashes):
        try:
            n = vision.geometry.num_tokens(img.width, img.height)
        except ValueError as exc:
            raise ImageShapeError(str(exc)) from None
        out.extend(ids[last:start])
        placed.append(PromptImage(img.data, h, len(out), n))
        out.extend([vision.image_token_id] * n)
        last = end
    out.extend(ids[last:])
    return out, tuple(placed)

