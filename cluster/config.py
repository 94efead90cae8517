"""Cluster configuration at the boundary (flags, YAML, Ray actor specs): pydantic models.

One set of field names serves `pdserve serve` flags, the YAML file (`--config`), the Ray actor
spec of each worker and the Helm values (its JSON schema is exported from `ClusterConfig`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["prefill", "decode", "mixed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    """What builds one engine (names as vLLM's flags)."""

    model: str | None = Field(None, description="HF folder or .gguf file; None = the default model (SmolLM2-135M-Instruct)")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    block_size: int = Field(16, gt=0)
    num_kv_blocks: int | None = Field(None, gt=0)
    kv_cache_memory_gb: float = Field(1.0, gt=0)
    enable_prefix_caching: bool = True
    quantization: Literal["wint8", "wint4"] | None = None
    device: str = "cpu"

    def engine_kwargs(self) -> dict:
        return self.model_dump(exclude={"model"})


class WorkerSpec(_Strict):
    """Everything one worker needs to start; travels to its Ray actor as plain JSON-able data."""

    role: Role
    engine: EngineArgs = EngineArgs()
    worker_id: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    advertise_host: str | None = Field(None, description="host others dial (default: host)")
    redis_url: str
    cluster: str = "default"
    kv_transport: Literal["nixl", "grpc"] = "nixl"
    kv_failure_policy: Literal["fail", "recompute"] = "fail"
    kv_lease_seconds: float = Field(30.0, gt=0)
    kv_timeout_seconds: float = Field(10.0, gt=0)
    heartbeat_seconds: float = Field(1.0, gt=0)
    registry_ttl_seconds: float = Field(10.0, gt=0)
    num_threads: int = Field(1, gt=0, description="torch intra-op threads for this worker")


class ClusterConfig(_Strict):
    """`pdserve serve` / `pdserve launch`: the whole cluster."""

    engine: EngineArgs = EngineArgs()
    served_model_name: str | None = None
    prefill: int = Field(1, ge=0)
    decode: int = Field(1, ge=0)
    mixed: int = Field(0, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = Field(None, description="None = start an embedded Redis")
    cluster: str = "default"
    kv_transport: Literal["nixl", "grpc"] = "nixl"
    kv_failure_policy: Literal["fail", "recompute"] = "fail"
    kv_lease_seconds: float = Field(30.0, gt=0)
    api_keys: tuple[str, ...] = ()
    rate_limit_per_minute: int | None = Field(None, gt=0)
    reasoning_parser: Literal["think"] | None = None
    worker_threads: int = Field(1, gt=0)
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting one")

    @model_validator(mode="after")
    def _roles(self) -> "ClusterConfig":
        if self.mixed == 0 and (self.prefill == 0 or self.decode == 0):
            raise ValueError("need --mixed N, or at least one prefill and one decode worker")
        return self

    def worker_spec(self, role: Role, redis_url: str) -> WorkerSpec:
        return WorkerSpec(role=role, engine=self.engine, host=self.host, redis_url=redis_url, cluster=self.cluster,
                          kv_transport=self.kv_transport, kv_failure_policy=self.kv_failure_policy,
                          kv_lease_seconds=self.kv_lease_seconds, num_threads=self.worker_threads)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ClusterConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
