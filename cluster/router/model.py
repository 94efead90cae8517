"""What the router knows of the model, read from its folder without torch or the engine.

A router process (`pdserve router`, a Kubernetes Deployment) needs the tokenizer, the chat
template, the context length and the EOS ids: `tokenizer.json`, `tokenizer_config.json`, the chat
template and `config.json` of the HF folder the workers serve. The default model and `.gguf` files
resolve to the folders the workers' loader converts them into (the model cache); the router cannot
convert a GGUF itself (that needs torch): run `pdserve convert` once, or point at the HF folder.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.router.backend import ModelInfo
from cluster.router.tokenizer import RouterTokenizer
from pdcommon.model_files import (DEFAULT_MAX_MODEL_LEN_CAP, DEFAULT_MODEL_NAME, converted_gguf_folder,
                                  flatten_text_config, model_cache_dir)
from pdcommon.vision import VisionInfo


def model_folder(model: str | None) -> Path:
    """The HF folder of `model` (None or the default name: the default model's converted folder)."""
    if model is None or model == DEFAULT_MODEL_NAME:
        path = model_cache_dir() / DEFAULT_MODEL_NAME
        hint = "start a worker once on this host, or run `pdserve convert`"
    else:
        path = Path(model).expanduser()
        hint = "run `pdserve convert --gguf FILE` once, or pass the HF folder"
        if path.is_file() and path.suffix.lower() == ".gguf":
            path = converted_gguf_folder(path.resolve())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} (for {model or DEFAULT_MODEL_NAME!r}) has no config.json: "
                                f"the router reads the converted HF folder ({hint})")
    return path


def default_served_name(model: str | None) -> str:
    """vLLM serves a model under the name it was given; the default model under its folder name."""
    return model if model else DEFAULT_MODEL_NAME


def load_model_info(model: str | None, served_model_name: str | None = None,
                    max_model_len: int | None = None, mm_processor_kwargs: Mapping[str, Any] | None = None) -> ModelInfo:
    """Tokenizer, context length and EOS ids of `model` (and for a vision model its image rule),
    torch-free (see the module docstring)."""
    folder = model_folder(model)
    hf = flatten_text_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    max_len = max_model_len or min(int(hf.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN_CAP)),
                                   DEFAULT_MAX_MODEL_LEN_CAP)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ModelInfo(served_model_name or default_served_name(model), max_len, RouterTokenizer(folder), eos_ids,
                     int(time.time()), VisionInfo.from_folder(folder, mm_processor_kwargs))
