"""Where models live on disk: the model cache, the default model's folder, converted GGUF folders.

The engine's loader converts GGUF files into HF folders under this cache; the router (no torch)
reads the tokenizer and config.json of the same folders.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# max_model_len when neither the flag nor the model's max_position_embeddings says less.
DEFAULT_MAX_MODEL_LEN_CAP = 8192


def model_cache_dir() -> Path:
    """Folder holding converted models: ``$PDSERVE_MODEL_CACHE`` or ``~/.cache/pdserve/models``."""
    env = os.environ.get("PDSERVE_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve" / "models"


def converted_gguf_folder(src: Path) -> Path:
    """The cache folder a GGUF file converts into: ``<stem>-<hash of (path, size, mtime)>``."""
    st = src.stat()
    key = f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()
    return model_cache_dir() / f"{src.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def flatten_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A vision-language config nests the language model's fields under `text_config`: lift them
    to the top (the top level's own keys win; `vision_config` stays nested)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        return hf
    return {**text, **{k: v for k, v in hf.items() if k != "text_config"}}
