"""LLM: the offline, vLLM-shaped API (`generate`, `chat`) over LLMEngine."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
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
        """Generate for each prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
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
                self.engine.add_request(rid, prompt, p)
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

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        if not messages:
            raise ValueError("messages is empty")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in convs], params)  # type: ignore[arg-type]
