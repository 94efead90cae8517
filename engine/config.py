"""Engine configuration: frozen dataclasses, validated on construction (ValueError on bad values)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pdcommon.model_files import DEFAULT_MAX_MODEL_LEN_CAP  # noqa: F401 - shared with the router
from pdcommon.model_files import flatten_text_config

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
QUANTIZATIONS = (None, "wint8", "wint4")
# transformers 5 writes some config fields under its internal name (a config class's
# attribute_map target): Qwen3-MoE's num_experts becomes num_local_experts in a saved config.json.
# Readers of hf_config (model classes, expert-parallel placement) look for the public name.
_HF_ALIASES = {"num_experts": "num_local_experts"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "bfloat16"/"float32" (or a torch dtype) to a torch dtype; anything else is a ValueError."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16):
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of: bfloat16, float32")


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a checkpoint, read from its config.json."""

    path: str
    architecture: str
    hf_config: dict[str, Any] = field(compare=False, repr=False)
    dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    max_position_embeddings: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {self.quantization!r} is not supported; use one of: wint8, wint4")

    @classmethod
    def from_hf_config(
        cls, path: str, hf: dict[str, Any], dtype: str | torch.dtype = "bfloat16", quantization: str | None = None
    ) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}/config.json has no 'architectures' entry")
        hf = flatten_text_config(hf)
        missing = {k: hf[v] for k, v in _HF_ALIASES.items() if k not in hf and v in hf}
        if missing:
            hf = {**hf, **missing}
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            path=str(path),
            architecture=archs[0],
            hf_config=hf,
            dtype=parse_dtype(dtype),
            quantization=quantization,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            hidden_size=int(hf["hidden_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN_CAP),
            eos_token_ids=eos_ids,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` tokens, per layer."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a positive power of two")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_blocks} must be >= 1")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb={self.kv_cache_memory_gb} must be > 0")

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return max(1, int(self.kv_cache_memory_gb * (1 << 30)) // bytes_per_block)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step, tokens per step, context length, and the
    image tokens the vision encoder may produce in one step (None: max_num_batched_tokens)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_num_encoder_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_num_encoder_tokens is not None and self.max_num_encoder_tokens < 1:
            raise ValueError(f"max_num_encoder_tokens={self.max_num_encoder_tokens} must be >= 1")

    @property
    def encoder_budget(self) -> int:
        return self.max_num_encoder_tokens or self.max_num_batched_tokens


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig

    def __post_init__(self) -> None:
        if self.scheduler.max_model_len > self.model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.scheduler.max_model_len} exceeds the model's "
                f"max_position_embeddings={self.model.max_position_embeddings}"
            )
