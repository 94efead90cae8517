"""gRPC channel and server options shared by routers and workers."""
from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20  # KV chunks are ~1 MiB; the limit only has to clear them with room to spare
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Trailing metadata on the UNAVAILABLE that ends a stream a role switch handed back to the router
# (migrate): the worker is healthy and only leaving the role, so the router resumes the stream
# elsewhere without marking the worker down or charging the request's failure budget.
MOVED_METADATA = ("pdserve-moved", "1")


def was_moved(exc) -> bool:
    """Whether a grpc.aio.AioRpcError ended a stream that a role switch handed back."""
    return any(k == MOVED_METADATA[0] for k, _ in (exc.trailing_metadata() or ()))


# With MOVED_METADATA: the moved request's KV, pinned on the worker it left (a serialized
# kv_pb2.KVHandle); the target pulls it instead of recomputing the request.
MOVED_KV_KEY = "pdserve-moved-kv-bin"


def moved_kv(exc) -> bytes | None:
    """The serialized KVHandle a moved stream's trailing metadata carries, if any."""
    for k, v in exc.trailing_metadata() or ():
        if k == MOVED_KV_KEY:
            return v if isinstance(v, bytes) else v.encode("latin-1")
    return None
