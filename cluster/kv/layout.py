"""KV layout identity: what two workers must agree on before KV blocks can move between them.

The hash covers everything that changes the bytes of a block (model, dtype, block size, KV heads,
head dim, layers) and the tensor-parallel shape. Expert parallelism is deliberately not part of
it: KV belongs to the replicated attention layers, so groups of different EP sizes interoperate.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from engine.config import EngineConfig

# Bump when the meaning of a block's bytes or of the KV wire messages changes.
# 1: first version (per-layer [num_blocks, 2, block_size, kv_heads, head_dim] tensors).
KV_PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class KVLayout:
    model: str  # architecture + shape fingerprint, not a file path (paths differ across hosts)
    dtype: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    tp_size: int = 1

    @classmethod
    def from_engine_config(cls, config: EngineConfig) -> "KVLayout":
        mc = config.model
        model = f"{mc.architecture}/h{mc.hidden_size}/v{mc.vocab_size}"
        return cls(model, mc.dtype_name, config.cache.block_size, mc.num_kv_heads, mc.head_dim, mc.num_layers)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer."""
        itemsize = {"float32": 4, "bfloat16": 2}[self.dtype]
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def hash(self) -> str:
        return hashlib.blake2b(self.describe().encode(), digest_size=8).hexdigest()

    def describe(self) -> str:
        return (f"model={self.model} dtype={self.dtype} block_size={self.block_size} kv_heads={self.num_kv_heads} "
                f"head_dim={self.head_dim} layers={self.num_layers} tp={self.tp_size}")
