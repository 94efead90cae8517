"""engine.loader: clear errors for bad model arguments; the default model converts once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine import loader


def test_missing_path_says_hub_is_not_supported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hub are not supported"):
        loader.resolve_model_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="hub are not supported"):
        loader.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct-does-not-exist")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        loader.resolve_model_path(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match="safetensors") as info:
        loader.resolve_model_path(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        next(loader.iter_weights(tmp_path))


def test_bad_argument_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model must be"):
        loader.resolve_model_path(123)  # type: ignore[arg-type]
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        loader.resolve_model_path(not_gguf)
    with pytest.raises(FileNotFoundError, match="config.json"):
        loader.load_config(tmp_path)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path))
    assert loader.model_cache_dir() == tmp_path
    monkeypatch.delenv("PDSERVE_MODEL_CACHE")
    assert loader.model_cache_dir() == Path.home() / ".cache" / "pdserve" / "models"


@pytest.mark.slow  # the first conversion takes ~20-40 s on 2 shared cores; cached afterwards
def test_default_model_converts_once() -> None:
    path = loader.resolve_model_path(None)
    assert path == loader.model_cache_dir() / loader.DEFAULT_MODEL_NAME
    config = loader.load_config(path)
    assert config["architectures"] == ["LlamaForCausalLM"]

    tokenizer = loader.load_tokenizer(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    names = {name for name, _ in loader.iter_weights(path)}
    assert "model.embed_tokens.weight" in names
    assert len([n for n in names if n.startswith("model.layers.")]) == 30 * 9

    # A second resolve reuses the folder: fast, nothing rewritten.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert loader.resolve_model_path(None) == path
    assert loader.resolve_model_path(loader.DEFAULT_MODEL_NAME) == path
    assert time.monotonic() - start < 2.0
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
