from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVHandle(_message.Message):
    __slots__ = ("worker_id", "kv_address", "request_id", "block_ids", "num_tokens", "layout_hash", "lease_expiry_unix", "transport", "mm_spans", "mrope_delta")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_UNIX_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    MM_SPANS_FIELD_NUMBER: _ClassVar[int]
    MROPE_DELTA_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    kv_address: str
    request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    layout_hash: str
    lease_expiry_unix: float
    transport: str
    mm_spans: _containers.RepeatedCompositeFieldContainer[MMSpan]
    mrope_delta: int
    def __init__(self, worker_id: _Optional[str] = ..., kv_address: _Optional[str] = ..., request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., layout_hash: _Optional[str] = ..., lease_expiry_unix: _Optional[float] = ..., transport: _Optional[str] = ..., mm_spans: _Optional[_Iterable[_Union[MMSpan, _Mapping]]] = ..., mrope_delta: _Optional[int] = ...) -> None: ...

class MMSpan(_message.Message):
    __slots__ = ("offset", "length", "content_hash")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    content_hash: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., content_hash: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "layout_hash", "worker_id", "transport", "layout_description")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    layout_hash: str
    worker_id: str
    transport: str
    layout_description: str
    def __init__(self, protocol_version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., worker_id: _Optional[str] = ..., transport: _Optional[str] = ..., layout_description: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("protocol_version", "layout_hash", "worker_id", "layout_description", "nixl_agent_name", "nixl_agent_metadata", "layer_base_addresses", "block_bytes", "num_blocks")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    LAYER_BASE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    layout_hash: str
    worker_id: str
    layout_description: str
    nixl_agent_name: str
    nixl_agent_metadata: bytes
    layer_base_addresses: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    num_blocks: int
    def __init__(self, protocol_version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., worker_id: _Optional[str] = ..., layout_description: _Optional[str] = ..., nixl_agent_name: _Optional[str] = ..., nixl_agent_metadata: _Optional[bytes] = ..., layer_base_addresses: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class PullBlocksRequest(_message.Message):
    __slots__ = ("request_id", "block_ids", "blocks_per_chunk")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    blocks_per_chunk: int
    def __init__(self, request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., blocks_per_chunk: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("offset", "num_blocks", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    num_blocks: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("request_id", "peer_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    peer_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., peer_worker_id: _Optional[str] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("ok", "lease_expiry_unix")
    OK_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_UNIX_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    lease_expiry_unix: float
    def __init__(self, ok: _Optional[bool] = ..., lease_expiry_unix: _Optional[float] = ...) -> None: ...
