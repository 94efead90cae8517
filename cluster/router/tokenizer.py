"""RouterTokenizer: a model folder's tokenizer and chat template without transformers or torch.

The router tokenizes prompts, renders chat templates and decodes single tokens (logprobs,
/detokenize); it needs only `tokenizer.json` (run by the `tokenizers` library), the folder's
`tokenizer_config.json` (special tokens, cleanup flag) and its chat template (`chat_template.jinja`,
`chat_template.json` or the config's `chat_template`), rendered by jinja2 the way transformers
renders it: a sandboxed environment with trim_blocks/lstrip_blocks and loop controls, `tojson`,
`raise_exception` and `strftime_now`, the special tokens as variables, and `continue_final_message`
cutting the text after the final message. The surface is the part of transformers' tokenizer the
router calls: `tok(text, add_special_tokens=...).input_ids`, `decode`, `len`, `chat_template`,
`apply_chat_template(..., tokenize=False)`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@dataclass(frozen=True)
class Encoding:
    input_ids: list[int]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    data: Any = config.get("chat_template")
    as_json = folder / "chat_template.json"
    if data is None and as_json.is_file():
        data = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(data, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in data if isinstance(t, dict)}
        data = named.get("default") or next(iter(named.values()), None)
    return data if isinstance(data, str) else None


def _cleanup(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces`: no space before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class RouterTokenizer:
    """The tokenizer of one HF model folder (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"model folder {self.folder} has no tokenizer.json (the router reads the "
                                    "fast-tokenizer file; save the tokenizer with transformers to write one)")
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = self.folder / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        self.special_tokens = {name: t for name in _SPECIAL if (t := _token_text(config.get(name))) is not None}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = _read_template(self.folder, config)

    # ----- tokens -----
    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens).input_ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _cleanup(text) if self.clean_up_tokenization_spaces else text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ----- chat -----
    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError(f"model folder {self.folder} has no chat template")

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` (dicts; None values dropped) with the chat template; ValueError on
        template errors or a final message the template does not reproduce."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        final = ""
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ValueError("continue_final_message is set but the final message has no text content")
            final = chat[-1]["content"]
            chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
        context = {**self.special_tokens, **kwargs}
        text = self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if final.strip() not in text or tag not in text:
                raise ValueError("continue_final_message is set but the chat template does not reproduce the "
                                 "final message")
            cut = text.rindex(tag)
            text = text[:cut] if text[cut:cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text
