"""Cluster configuration at the boundary (flags, YAML, Ray actor specs): pydantic models.

One set of field names serves `pdserve serve` flags, the YAML file (`--config`), the Ray actor
spec of each worker and the Helm values (its JSON schema is exported from `ClusterConfig`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    expert_parallel_size: int = Field(1, ge=1, description="MoE models: shard the routed experts over N ranks "
                                      "(this process + N-1 children, one torch thread each)")
    num_redundant_experts: int = Field(0, ge=0, description="EP: extra expert slots per rank for replicas of hot experts")
    eplb_interval: int = Field(0, ge=0, description="EP: rebalance expert placement from observed load every N steps (0: off)")
    ep_dispatch: Literal["replicated", "alltoall"] = Field(
        "replicated", description="EP: move only expert results (replicated) or also hidden states (alltoall)")

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
    migrate_kv: bool = Field(True, description="a migrating role switch moves each running sequence's KV to the "
                             "target (pulled over the KV transport); false: the target recomputes it")
    heartbeat_seconds: float = Field(1.0, gt=0)
    registry_ttl_seconds: float = Field(10.0, gt=0)
    drain_timeout_seconds: float = Field(
        60.0, gt=0, description="role switch: how long in-flight work of the dropped role may take to finish "
        "before the switch rolls back (SetRole's drain_timeout_s overrides)")
    num_threads: int = Field(1, gt=0, description="torch intra-op threads for this worker")
    cpu_cores: tuple[int, ...] | None = Field(
        None, description="cores this worker's threads are pinned to (None = not pinned); see cluster/cpu_binding.py")

    @property
    def num_cpus(self) -> int:
        """CPUs to reserve: rank 0's threads plus one per other rank of an expert-parallel group."""
        return self.num_threads + self.engine.expert_parallel_size - 1


class WorkerGroup(_Strict):
    """`count` workers of one role with their own expert-parallel size (YAML `workers:`)."""

    role: Role
    count: int = Field(1, ge=1)
    expert_parallel_size: int | None = Field(None, ge=1, description="None = engine.expert_parallel_size")


class PlannerSettings(_Strict):
    """The SLA planner (cluster/planner): switches worker roles as the traffic mix changes. Off by
    default; YAML `planner: true` is short for `planner: {enabled: true}`."""

    enabled: bool = Field(False, description="run the planner in the router (one acts: a Redis lease elects it)")
    slo_ttft_ms: float | None = Field(None, gt=0, description="time-to-first-token target, p90 (None = no TTFT signal)")
    slo_itl_ms: float | None = Field(None, gt=0, description="inter-token latency target, p90 (None = no ITL signal)")
    interval_s: float = Field(5.0, gt=0, description="seconds between observations")
    hysteresis: int = Field(3, ge=1, description="consecutive observations a pressure must persist before a switch")
    cooldown_s: float = Field(60.0, ge=0, description="a worker is not switched again within this many seconds")
    global_cooldown_s: float = Field(20.0, ge=0, description="no switch within this many seconds of any other")
    max_switches_per_window: int = Field(4, ge=1, description="at most this many switches begin per window")
    window_s: float = Field(600.0, gt=0, description="the window of max_switches_per_window, seconds")
    min_prefill: int = Field(1, ge=0, description="prefill workers to keep (mixed ones count)")
    min_decode: int = Field(1, ge=0, description="decode workers to keep (mixed ones count)")
    prefill_queue_tokens_high: float = Field(4096, gt=0, description="prefill pressure: queued prompt tokens "
                                                                      "per prefill worker above this")
    decode_seqs_high: float = Field(32, gt=0, description="decode pressure: running + waiting sequences per "
                                                          "decode worker above this")
    kv_usage_high: float = Field(0.85, gt=0, le=1, description="decode pressure: mean KV usage above this")
    slack: float = Field(0.8, gt=0, le=1, description="a latency has slack while its p90 <= slack x its SLO")
    margin: float = Field(0.8, gt=0, le=1, description="the side giving a worker up must stay under margin x "
                                                       "its threshold afterwards")
    switch_mixed: bool = Field(False, description="mixed workers may be switched (to prefill or decode)")
    migrate: bool = Field(True, description="hand a leaving decode worker's streams to others instead of "
                                            "waiting for them")
    drain_timeout_s: float | None = Field(None, gt=0, description="per switch; None = the worker's default")
    lease_ttl_s: float = Field(15.0, gt=0, description="leader lease; renewed every interval")
    latency_window_s: float = Field(60.0, gt=0, description="TTFT/ITL percentiles over the last this many seconds")
    trace_file: str | None = Field(None, description="append every observation and its decisions to this file "
                                                     "as JSON lines (a trace to replay through the core offline)")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data

    @model_validator(mode="after")
    def _lease(self) -> "PlannerSettings":
        if self.lease_ttl_s <= self.interval_s:
            raise ValueError(f"planner lease_ttl_s ({self.lease_ttl_s}) must exceed interval_s ({self.interval_s}): "
                             "the leader renews it once per interval")
        return self

    def core_config(self):
        """The pure core's PlannerConfig (cluster.planner.core) from these settings."""
        from dataclasses import fields

        from cluster.planner.core import PlannerConfig

        names = {f.name for f in fields(PlannerConfig)}
        return PlannerConfig(**self.model_dump(include=names))


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
    migrate_kv: bool = Field(True, description="a migrating role switch moves each running sequence's KV to the "
                             "target (pulled over the KV transport); false: the target recomputes it")
    api_keys: tuple[str, ...] = Field((), repr=False)
    admin_api_keys: tuple[str, ...] = Field(
        (), repr=False, description="keys of the router's /admin API (worker list, role switches); empty = off")
    drain_timeout_seconds: float = Field(
        60.0, gt=0, description="role switch: how long a worker waits for in-flight work of its old role")
    rate_limit_per_minute: int | None = Field(None, gt=0)
    reasoning_parser: Literal["think"] | None = None
    worker_threads: int = Field(1, gt=0)
    cpu_bind: str = Field(
        "auto", description="pin each local worker's threads to its own cores: 'auto' (consecutive cores per "
        "worker when this session starts Ray and they fit), 'none', or core sets per worker such as '0|1' or '0-1|2-3'")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting one")
    workers: tuple[WorkerGroup, ...] = Field(
        (), description="explicit worker list (sets the prefill/decode/mixed counts); for per-worker EP sizes")
    planner: PlannerSettings = Field(PlannerSettings(), description="the SLA planner (role switches); off by default")

    @model_validator(mode="before")
    @classmethod
    def _counts_from_workers(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("workers"):
            return data
        groups = [WorkerGroup.model_validate(g) if isinstance(g, dict) else g for g in data["workers"]]
        counts = {role: sum(g.count for g in groups if g.role == role) for role in ("prefill", "decode", "mixed")}
        for role, n in counts.items():
            if data.get(role) is not None and data[role] != n:
                raise ValueError(f"{role}={data[role]} contradicts `workers`, which lists {n} {role} worker(s)")
        return {**data, **counts}

    @field_validator("cpu_bind")
    @classmethod
    def _cpu_bind(cls, v: str) -> str:
        from cluster.cpu_binding import validate_binding

        return validate_binding(v)

    @model_validator(mode="after")
    def _roles(self) -> "ClusterConfig":
        if self.mixed == 0 and (self.prefill == 0 or self.decode == 0):
            raise ValueError("need --mixed N, or at least one prefill and one decode worker")
        return self

    def worker_spec(self, role: Role, redis_url: str, expert_parallel_size: int | None = None) -> WorkerSpec:
        """`expert_parallel_size` None = the engine's."""
        ep = expert_parallel_size or self.engine.expert_parallel_size
        engine = self.engine if ep == self.engine.expert_parallel_size else \
            self.engine.model_copy(update={"expert_parallel_size": ep})
        return WorkerSpec(role=role, engine=engine, host=self.host, redis_url=redis_url, cluster=self.cluster,
                          kv_transport=self.kv_transport, kv_failure_policy=self.kv_failure_policy,
                          kv_lease_seconds=self.kv_lease_seconds, num_threads=self.worker_threads,
                          drain_timeout_seconds=self.drain_timeout_seconds, migrate_kv=self.migrate_kv)

    def worker_specs(self, redis_url: str) -> list[WorkerSpec]:
        """Every worker to start, in start order."""
        if self.workers:
            return [self.worker_spec(g.role, redis_url, g.expert_parallel_size) for g in self.workers
                    for _ in range(g.count)]
        roles: list[Role] = ["mixed"] * self.mixed
        if self.prefill and self.decode:
            roles += ["prefill"] * self.prefill + ["decode"] * self.decode
        return [self.worker_spec(role, redis_url) for role in roles]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ClusterConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
