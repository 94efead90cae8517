from pdserve.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_MIXED: _ClassVar[Role]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_MIXED: Role
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "skip_special_tokens", "include_stop_str_in_output")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., skip_special_tokens: _Optional[bool] = ..., include_stop_str_in_output: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "epoch", "resume_token_ids", "media")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    epoch: int
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., epoch: _Optional[int] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("modality", "data")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    modality: str
    data: bytes
    def __init__(self, modality: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "finish_reason", "stop_reason", "num_prompt_tokens", "num_cached_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    finish_reason: FinishReason
    stop_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first", "handle", "prefill_seconds")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    first: TokenChunk
    handle: _kv_pb2.KVHandle
    prefill_seconds: float
    def __init__(self, first: _Optional[_Union[TokenChunk, _Mapping]] = ..., handle: _Optional[_Union[_kv_pb2.KVHandle, _Mapping]] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "handle", "first_token_id", "first_logprobs")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    handle: _kv_pb2.KVHandle
    first_token_id: int
    first_logprobs: TokenLogprobs
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., handle: _Optional[_Union[_kv_pb2.KVHandle, _Mapping]] = ..., first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ready", "role", "epoch", "worker_id", "message", "phase", "phase_since_unix", "target_role", "reason", "history", "role_switches_total", "role_rollbacks_total")
    READY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ROLE_SWITCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_ROLLBACKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    role: Role
    epoch: int
    worker_id: str
    message: str
    phase: str
    phase_since_unix: float
    target_role: Role
    reason: str
    history: _containers.RepeatedCompositeFieldContainer[PhaseEvent]
    role_switches_total: int
    role_rollbacks_total: int
    def __init__(self, ready: _Optional[bool] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., worker_id: _Optional[str] = ..., message: _Optional[str] = ..., phase: _Optional[str] = ..., phase_since_unix: _Optional[float] = ..., target_role: _Optional[_Union[Role, str]] = ..., reason: _Optional[str] = ..., history: _Optional[_Iterable[_Union[PhaseEvent, _Mapping]]] = ..., role_switches_total: _Optional[int] = ..., role_rollbacks_total: _Optional[int] = ...) -> None: ...

class PhaseEvent(_message.Message):
    __slots__ = ("phase", "ts_unix", "role", "epoch", "target_role", "note")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROLE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    ts_unix: float
    role: Role
    epoch: int
    target_role: Role
    note: str
    def __init__(self, phase: _Optional[str] = ..., ts_unix: _Optional[float] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., target_role: _Optional[_Union[Role, str]] = ..., note: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker_id", "role", "epoch", "num_requests_running", "num_requests_waiting", "num_holding_kv", "num_waiting_for_kv", "num_free_blocks", "num_blocks", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_total", "generation_tokens_total", "num_preemptions", "queued_prefill_tokens", "kv_transfers_total", "kv_transfer_bytes_total", "kv_transfer_seconds_total", "kv_transfer_failures_total", "kv_lease_expired_total", "kv_recompute_total", "kv_blocks_skipped_total", "kv_blocks_served_total", "num_active_leases", "role_switches_total", "expert_parallel_size", "expert_load", "requests_resumed_total", "role_switch_counts", "role_switch_phase_seconds", "sequences_migrated_total", "sequences_migrated_in_total", "migration_recompute_total")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_HOLDING_KV_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FOR_KV_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FAILURES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_LEASE_EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_RECOMPUTE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_SKIPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_SERVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    ROLE_SWITCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RESUMED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_SWITCH_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ROLE_SWITCH_PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_MIGRATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_MIGRATED_IN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_RECOMPUTE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    epoch: int
    num_requests_running: int
    num_requests_waiting: int
    num_holding_kv: int
    num_waiting_for_kv: int
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    queued_prefill_tokens: int
    kv_transfers_total: int
    kv_transfer_bytes_total: int
    kv_transfer_seconds_total: float
    kv_transfer_failures_total: int
    kv_lease_expired_total: int
    kv_recompute_total: int
    kv_blocks_skipped_total: int
    kv_blocks_served_total: int
    num_active_leases: int
    role_switches_total: int
    expert_parallel_size: int
    expert_load: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    requests_resumed_total: int
    role_switch_counts: _containers.RepeatedCompositeFieldContainer[RoleSwitchCount]
    role_switch_phase_seconds: _containers.RepeatedCompositeFieldContainer[PhaseHistogram]
    sequences_migrated_total: int
    sequences_migrated_in_total: int
    migration_recompute_total: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., num_requests_running: _Optional[int] = ..., num_requests_waiting: _Optional[int] = ..., num_holding_kv: _Optional[int] = ..., num_waiting_for_kv: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generation_tokens_total: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., kv_transfers_total: _Optional[int] = ..., kv_transfer_bytes_total: _Optional[int] = ..., kv_transfer_seconds_total: _Optional[float] = ..., kv_transfer_failures_total: _Optional[int] = ..., kv_lease_expired_total: _Optional[int] = ..., kv_recompute_total: _Optional[int] = ..., kv_blocks_skipped_total: _Optional[int] = ..., kv_blocks_served_total: _Optional[int] = ..., num_active_leases: _Optional[int] = ..., role_switches_total: _Optional[int] = ..., expert_parallel_size: _Optional[int] = ..., expert_load: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., requests_resumed_total: _Optional[int] = ..., role_switch_counts: _Optional[_Iterable[_Union[RoleSwitchCount, _Mapping]]] = ..., role_switch_phase_seconds: _Optional[_Iterable[_Union[PhaseHistogram, _Mapping]]] = ..., sequences_migrated_total: _Optional[int] = ..., sequences_migrated_in_total: _Optional[int] = ..., migration_recompute_total: _Optional[int] = ...) -> None: ...

class PhaseHistogram(_message.Message):
    __slots__ = ("phase", "upper_bounds", "bucket_counts", "sum")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    UPPER_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    phase: str
    upper_bounds: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, phase: _Optional[str] = ..., upper_bounds: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class RoleSwitchCount(_message.Message):
    __slots__ = ("from_role", "to_role", "count")
    FROM_ROLE_FIELD_NUMBER: _ClassVar[int]
    TO_ROLE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    from_role: Role
    to_role: Role
    count: int
    def __init__(self, from_role: _Optional[_Union[Role, str]] = ..., to_role: _Optional[_Union[Role, str]] = ..., count: _Optional[int] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role", "expected_epoch", "drain_timeout_s", "migrate", "wait")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    role: Role
    expected_epoch: int
    drain_timeout_s: float
    migrate: bool
    wait: bool
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., expected_epoch: _Optional[int] = ..., drain_timeout_s: _Optional[float] = ..., migrate: _Optional[bool] = ..., wait: _Optional[bool] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("role", "epoch", "phase", "changed", "message")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    role: Role
    epoch: int
    phase: str
    changed: bool
    message: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., phase: _Optional[str] = ..., changed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
