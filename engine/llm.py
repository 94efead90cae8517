"""LLM: the offline, vLLM-shaped API (`generate`, `chat`) over LLMEngine."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Offline generation. `LLM()` serves the default model (SmolLM2-135M-Instruct) in bf16.

    Keyword arguments are those of `LLMEngine.from_args`: dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, block_size, num_kv_blocks, kv_cache_memory_gb,
    enable_prefix_caching, quantization ("wint8" | "wint4"), device, expert_parallel_size
    (MoE models: N processes share the routed experts; `close()` or `with LLM(...)` stops them).
    """

    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine.from_args(None if model is None else str(model), **kwargs)
        self._ids = itertools.count()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_path(self) -> str:
        """The resolved local HF folder (the converted cache folder for the default model or a GGUF)."""
        return self.engine.config.model.path

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order. A prompt is text, token ids,
        or vLLM's dict form {"prompt": text} / {"prompt_token_ids": ids} with an optional
        "multi_modal_data": {"image": image or list} (PIL images, bytes, paths, data URLs)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(params, Sequence):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
            param_list = list(params)
        else:
            param_list = [params or SamplingParams()] * len(prompts)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, p in zip(ids, prompts, param_list):
                text_or_ids, mm = _split_prompt(prompt)
                self.engine.add_request(rid, text_or_ids, p, multi_modal_data=mm)
                added.append(rid)
        except Exception:
            for rid in added:  # a bad prompt rejects the whole call and leaves nothing queued
                self.engine.abort(rid)
            raise
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        latest: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
        heads: dict[str, RequestOutput] = {}
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in latest:
                        continue
                    heads[out.request_id] = out
                    for c in out.outputs:
                        latest[out.request_id][c.index] = c
                    if out.finished:
                        pending.discard(out.request_id)
        except BaseException:
            for rid in pending:
                self.engine.abort(rid)
            raise
        results = []
        for rid in ids:
            head = heads[rid]
            comps = tuple(latest[rid][i] for i in sorted(latest[rid]))
            results.append(RequestOutput(rid, head.prompt, head.prompt_token_ids, comps, True, head.num_cached_tokens))
        return results

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        if not messages:
            raise ValueError("messages is empty")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **(chat_template_kwargs or {}))
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them and generate.
        Content may be OpenAI content parts: {"type": "text"}, {"type": "image_url", "image_url":
        {"url": data URL or local path}} and {"type": "image", "image": PIL image}; the template
        renders each image's placeholder and the images go with the prompt, in order."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        for conv in convs:
            conv, images = chat_images(conv)  # type: ignore[arg-type]
            ids = self.apply_chat_template(conv, chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else ids)
        return self.generate(prompts, params)


def _split_prompt(prompt: Prompt) -> tuple[str | list[int], dict[str, Any] | None]:
    if not isinstance(prompt, dict):
        return prompt, None
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
    if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError('a dict prompt has exactly one of "prompt" or "prompt_token_ids", and optionally '
                         f'"multi_modal_data"; got keys {sorted(prompt)}')
    return prompt.get("prompt", prompt.get("prompt_token_ids")), prompt.get("multi_modal_data")


def chat_images(messages: list[Message]) -> tuple[list[Message], list[Any]]:
    """The images of a conversation's content parts, in order, and the messages with each image
    part reduced to {"type": "image"} (what chat templates render as a placeholder)."""
    out: list[Message] = []
    images: list[Any] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError("an image_url part needs {'url': ...}")
                images.append(url.removeprefix("file://"))
                parts.append({"type": "image"})
            elif kind in ("image", "image_pil"):
                images.append(part.get(kind) if kind in part else part.get("image"))
                parts.append({"type": "image"})
            elif kind in ("video", "video_url"):
                raise ValueError("video input is not supported")
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images
