"""gRPC channel and server options shared by routers and workers."""
from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20  # KV chunks are ~1 MiB; the limit only has to clear them with room to spare
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
