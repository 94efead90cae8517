"""Cluster configuration at the boundary (flags, YAML, Ray actor specs): pydantic models.

One set of field names serves `pdserve serve` flags, the YAML file (`--config`), the Ray actor
spec of each worker and the Helm values (its JSON schema is exported from `ClusterConfig`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.router.media.policy import MediaSettings

ReasoningParserName = Literal["think", "qwen3", "deepseek_r1", "ernie-45-vl", "ernie45"]

Role = Literal["prefill", "decode", "mixed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    """What builds one engine (names as vLLM's flags)."""

    model: str | None = Field(None, description="HF folder or .gguf file; None = the default model (SmolLM2-135M-Instruct)")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="weights and activations dtype")
    max_model_len: int | None = Field(None, gt=0, description="context length (prompt + output); None = the "
                                      "model's max_position_embeddings, capped at 8192")
    max_num_seqs: int = Field(64, gt=0, description="sequences one engine runs at once")
    max_num_batched_tokens: int = Field(2048, gt=0, description="token budget of one engine step (chunked prefill)")
    block_size: int = Field(16, gt=0, description="tokens per KV cache block (routers must use the workers' value)")
    num_kv_blocks: int | None = Field(None, gt=0, description="KV blocks per worker; None = from kv_cache_memory_gb")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="memory for the KV cache per worker, GiB")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of shared prompt prefixes")
    quantization: Literal["wint8", "wint4"] | None = Field(None, description="weight-only quantization of the "
                                                          "linear layers; None = the model's dtype")
    device: str = Field("cpu", description="torch device of the engine (cpu, cuda, cuda:N)")
    expert_parallel_size: int = Field(1, ge=1, description="MoE models: shard the routed experts over N ranks "
                                      "(this process + N-1 children, one torch thread each)")
    num_redundant_experts: int = Field(0, ge=0, description="EP: extra expert slots per rank for replicas of hot experts")
    eplb_interval: int = Field(0, ge=0, description="EP: rebalance expert placement from observed load every N steps (0: off)")
    ep_dispatch: Literal["replicated", "alltoall"] = Field(
        "replicated", description="EP: move only expert results (replicated) or also hidden states (alltoall)")
    mm_processor_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vision models: options of the image processor, as vLLM's "
        "--mm-processor-kwargs (e.g. {\"max_pixels\": 802816}); every image's content hash mixes them in")

    @field_validator("mm_processor_kwargs")
    @classmethod
    def _mm_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        from pdcommon.vision import geometry_options

        geometry_options(kwargs)  # ValueError naming a bad size option
        return kwargs

    def engine_kwargs(self) -> dict:
        return self.model_dump(exclude={"model"})


class WorkerSpec(_Strict):
    """Everything one worker needs to start; travels to its Ray actor as plain JSON-able data."""

    role: Role = Field(description="the role the worker starts in")
    engine: EngineArgs = Field(EngineArgs(), description="what builds the worker's engine")
    worker_id: str | None = Field(None, description="registry id; None = '<role>-<random>'")
    host: str = Field("127.0.0.1", description="bind address of the worker's gRPC server (it serves KV too)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    advertise_host: str | None = Field(None, description="host others dial; None = `host`, or this node's IP "
                                       "when `host` is a wildcard (0.0.0.0, ::)")
    redis_url: str = Field(description="the cluster's Redis, where the worker registers")
    cluster: str = Field("default", description="cluster name: the prefix of the worker's Redis keys")
    kv_transport: Literal["nixl", "grpc"] = Field("nixl", description="how decode workers pull KV blocks")
    kv_failure_policy: Literal["fail", "recompute"] = Field(
        "fail", description="a KV pull that fails: fail the request, or recompute the prompt on the decode worker")
    kv_lease_seconds: float = Field(30.0, gt=0, description="how long a prefill worker holds KV for its decode "
                                    "worker to pull")
    kv_timeout_seconds: float = Field(10.0, gt=0, description="deadline of one KV pull")
    migrate_kv: bool = Field(True, description="a migrating role switch moves each running sequence's KV to the "
                             "target (pulled over the KV transport); false: the target recomputes it")
    heartbeat_seconds: float = Field(1.0, gt=0, description="seconds between registry heartbeats")
    registry_ttl_seconds: float = Field(10.0, gt=0, description="a registry entry not refreshed for this long expires")
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

    role: Role = Field(description="the workers' role")
    count: int = Field(1, ge=1, description="how many workers of this group")
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


class PoolPlacement(_Strict):
    """Where Ray places the workers of one pool (role) under `pdserve launch`."""

    num_cpus: float | None = Field(None, ge=0, description="CPUs each worker reserves; None = worker_threads "
                                   "(plus one per extra rank of an expert-parallel group, in its placement group)")
    num_gpus: float = Field(0, ge=0, description="GPUs each worker reserves (rank 0 of an EP group; each other rank "
                            "reserves the same in its bundle)")
    memory_gb: float | None = Field(None, gt=0, description="memory each worker reserves in Ray, GiB; None = none")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each worker asks "
                                        "for, e.g. {prefill_pool: 1} to pin the pool to the nodes that offer it")
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels the worker's node must "
                                        "have (label_selector), e.g. {ray.io/node-group: prefill}")

    def ray_options(self, default_cpus: float) -> dict[str, Any]:
        """Ray actor options of one worker (rank 0)."""
        opts: dict[str, Any] = {"num_cpus": default_cpus if self.num_cpus is None else self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * (1 << 30))
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.node_labels:
            opts["label_selector"] = dict(self.node_labels)
        return opts


class Placement(_Strict):
    """Per-pool placement (`placement: {prefill: ..., decode: ..., mixed: ...}`) under `pdserve launch`."""

    prefill: PoolPlacement = Field(PoolPlacement(), description="the prefill pool")
    decode: PoolPlacement = Field(PoolPlacement(), description="the decode pool")
    mixed: PoolPlacement = Field(PoolPlacement(), description="the mixed pool")
    ep_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement group strategy of an expert-parallel worker's ranks (one group each)")

    def pool(self, role: Role) -> PoolPlacement:
        return getattr(self, role)


class LaunchSettings(_Strict):
    """`pdserve launch` (the `ray job submit` entrypoint): what it places and how long it lives."""

    namespace: str | None = Field(None, description="Ray namespace of the cluster's named actors; None = "
                                  "'pdserve-<cluster>'. A second launch in the same namespace reconciles")
    workers_outlive_job: bool = Field(False, description="leave the workers (and router actors) running when the "
                                      "launch job stops (ray job stop, SIGTERM); the next launch adopts them")
    start_redis: bool = Field(False, description="when nothing answers at redis_url, start a Redis there: a "
                              "detached actor on the node the URL names (its IP, or the head for 127.0.0.1), "
                              "nothing persisted; false = join the Redis at redis_url only")
    routers: int = Field(0, ge=0, description="routers to run as Ray actors (router i listens on port + i); "
                         "0 = none (run `pdserve router` processes instead)")
    router_num_cpus: float = Field(1.0, ge=0, description="CPUs each router actor reserves")
    router_placement: PoolPlacement = Field(PoolPlacement(), description="where router actors go (num_cpus is "
                                            "router_num_cpus unless set here)")
    start_timeout_s: float = Field(600.0, gt=0, description="how long workers may take to load and register")
    reconcile_interval_s: float = Field(10.0, gt=0, description="while it runs, launch re-checks every this many "
                                        "seconds and replaces workers that died")
    stop_timeout_s: float = Field(2.0, gt=0, description="on stop, how long workers get to deregister before they "
                                  "are killed (ray job stop allows RAY_JOB_STOP_WAIT_TIME_S, 3 s by default)")

    def namespace_for(self, cluster: str) -> str:
        return self.namespace or f"pdserve-{cluster}"


class ClusterConfig(_Strict):
    """`pdserve serve` / `pdserve launch`: the whole cluster."""

    engine: EngineArgs = Field(EngineArgs(), description="what builds each worker's engine (vLLM's flag names)")
    served_model_name: str | None = Field(None, description="model name in the API; None = the model argument, or "
                                          "the default model's name")
    prefill: int = Field(1, ge=0, description="prefill workers")
    decode: int = Field(1, ge=0, description="decode workers")
    mixed: int = Field(0, ge=0, description="colocated workers (prefill and decode in one)")
    host: str = Field("127.0.0.1", description="the router's bind address; under `pdserve serve` the workers' too")
    port: int = Field(8000, ge=0, le=65535, description="the router's HTTP port (0 = pick a free one)")
    worker_host: str | None = Field(None, description="workers' bind address (gRPC + KV); None = `host` under "
                                    "`pdserve serve`, 0.0.0.0 under `pdserve launch`")
    worker_port: int = Field(0, ge=0, le=65535, description="workers' gRPC port (Worker and KV services); 0 = a free "
                             "port each. A fixed port (one a NetworkPolicy can name) allows one worker per node")
    advertise_host: str | None = Field(None, description="address workers register for others to dial; None = "
                                       "the bind address, or the node's IP (Ray's) when that is a wildcard")
    redis_url: str | None = Field(None, description="the cluster-state Redis; None = start an embedded one "
                                  "(`pdserve serve` only: launch and routers need a URL every node can reach)")
    cluster: str = Field("default", description="cluster name: prefix of its Redis keys, and its Ray namespace")
    kv_transport: Literal["nixl", "grpc"] = Field("nixl", description="how decode workers pull KV blocks")
    kv_failure_policy: Literal["fail", "recompute"] = Field(
        "fail", description="a KV pull that fails: fail the request, or recompute the prompt on the decode worker")
    kv_lease_seconds: float = Field(30.0, gt=0, description="how long a prefill worker holds KV for the pull")
    migrate_kv: bool = Field(True, description="a migrating role switch moves each running sequence's KV to the "
                             "target (pulled over the KV transport); false: the target recomputes it")
    api_keys: tuple[str, ...] = Field((), repr=False, description="accepted Bearer keys of the API; empty = no "
                                      "auth (give them from a Secret or $PDSERVE_API_KEY, not in a file)")
    admin_api_keys: tuple[str, ...] = Field(
        (), repr=False, description="keys of the router's /admin API (worker list, role switches); empty = off")
    drain_timeout_seconds: float = Field(
        60.0, gt=0, description="role switch: how long a worker waits for in-flight work of its old role")
    rate_limit_per_minute: int | None = Field(None, gt=0, description="requests per minute per API key, counted "
                                              "in Redis (shared by every router)")
    reasoning_parser: ReasoningParserName | None = Field(
        None, description="split reasoning into reasoning_content: 'think'/'qwen3' (<think>...</think>), "
        "'deepseek_r1' (output starts inside reasoning), 'ernie-45-vl'/'ernie45' (also unwraps <response>)")
    multimodal: MediaSettings = Field(MediaSettings(), description="image input (vision models): limits, caps, "
                                      "which URLs the router fetches")
    worker_threads: int = Field(1, gt=0, description="torch threads per worker")
    cpu_bind: str = Field(
        "auto", description="pin each local worker's threads to its own cores: 'auto' (consecutive cores per "
        "worker when this session starts Ray and they fit), 'none', or core sets per worker such as '0|1' or '0-1|2-3'")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting one")
    workers: tuple[WorkerGroup, ...] = Field(
        (), description="explicit worker list (sets the prefill/decode/mixed counts); for per-worker EP sizes")
    planner: PlannerSettings = Field(PlannerSettings(), description="the SLA planner (role switches); off by default")
    placement: Placement = Field(Placement(), description="`pdserve launch`: resources and node pools per role")
    launch: LaunchSettings = Field(LaunchSettings(), description="`pdserve launch`: namespace, router actors, "
                                   "lifetime")

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

    def worker_spec(self, role: Role, redis_url: str, expert_parallel_size: int | None = None,
                    host: str | None = None) -> WorkerSpec:
        """`expert_parallel_size` None = the engine's; `host` None = `worker_host`, else `host`."""
        ep = expert_parallel_size or self.engine.expert_parallel_size
        engine = self.engine if ep == self.engine.expert_parallel_size else \
            self.engine.model_copy(update={"expert_parallel_size": ep})
        return WorkerSpec(role=role, engine=engine, host=host or self.worker_host or self.host, port=self.worker_port,
                          advertise_host=self.advertise_host, redis_url=redis_url, cluster=self.cluster,
                          kv_transport=self.kv_transport, kv_failure_policy=self.kv_failure_policy,
                          kv_lease_seconds=self.kv_lease_seconds, num_threads=self.worker_threads,
                          drain_timeout_seconds=self.drain_timeout_seconds, migrate_kv=self.migrate_kv)

    def worker_specs(self, redis_url: str, host: str | None = None) -> list[WorkerSpec]:
        """Every worker to start, in start order (`host`: as in `worker_spec`)."""
        if self.workers:
            return [self.worker_spec(g.role, redis_url, g.expert_parallel_size, host) for g in self.workers
                    for _ in range(g.count)]
        roles: list[Role] = ["mixed"] * self.mixed
        if self.prefill and self.decode:
            roles += ["prefill"] * self.prefill + ["decode"] * self.decode
        return [self.worker_spec(role, redis_url, host=host) for role in roles]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ClusterConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
