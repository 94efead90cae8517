"""gRPC fallback transport: KV blocks as raw bytes in a PullBlocks server stream.

Wire layout of one chunk: [num_layers, n, 2, block_size, kv_heads, head_dim] in the cache dtype,
little-endian, contiguous. Bytes go through torch views only (bf16 has no numpy dtype).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from cluster.rpc import MAX_MESSAGE_BYTES
from pdserve.v1 import kv_pb2, kv_pb2_grpc

CHUNK_BYTES = 1 << 20  # ~1 MiB messages stream at ~1 GB/s over loopback; one unary per chunk is 5x slower


def bytes_per_block(kv_caches: Sequence[torch.Tensor]) -> int:
    """Bytes of one block across all layers."""
    first = kv_caches[0]
    return len(kv_caches) * first[0].numel() * first.element_size()


def blocks_per_chunk(kv_caches: Sequence[torch.Tensor], requested: int = 0) -> int:
    """`requested` when given (capped so a chunk fits a message), else about CHUNK_BYTES' worth."""
    per_block = bytes_per_block(kv_caches)
    cap = max(1, (MAX_MESSAGE_BYTES - 4096) // per_block)
    if requested > 0:
        return min(requested, cap)
    return max(1, min(cap, CHUNK_BYTES // per_block))


def runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first block, count) of each run of consecutive ids: one slice copy each."""
    out: list[list[int]] = []
    for i, b in enumerate(block_ids):
        if out and out[-1][1] + out[-1][2] == b:
            out[-1][2] += 1
        else:
            out.append([i, int(b), 1])
    return [(i, b, n) for i, b, n in out]


def blocks_to_bytes(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> bytes:
    # One copy: join() gathers the per-layer slices straight into the bytes object.
    parts = runs(block_ids)
    return b"".join(
        memoryview(cache[b : b + n].view(torch.uint8).numpy()).cast("B") for cache in kv_caches for _, b, n in parts
    )


def bytes_to_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], data: bytes) -> None:
    """Write one chunk (as made by blocks_to_bytes) into `block_ids` of the local caches."""
    first = kv_caches[0]
    n = len(block_ids)
    expected = n * bytes_per_block(kv_caches)
    if len(data) != expected:
        raise ValueError(f"chunk of {n} blocks has {len(data)} bytes, expected {expected}")
    with warnings.catch_warnings():
        # frombuffer warns on read-only bytes; this view is only read from.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    src = raw.view(first.dtype).view(len(kv_caches), n, *first.shape[1:])
    parts = runs(block_ids)
    for layer, cache in enumerate(kv_caches):
        for i, b, count in parts:
            cache[b : b + count].copy_(src[layer, i : i + count])


async def pull_blocks(
    stub: kv_pb2_grpc.KVStub,
    request_id: str,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    kv_caches: Sequence[torch.Tensor],
    timeout_s: float,
    blocks_per_chunk_: int = 0,
) -> int:
    """Stream the peer's `src_block_ids` into local `dst_block_ids`; returns bytes received.

    Raises grpc.aio.AioRpcError from the call, ValueError on a malformed stream.
    """
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks")
    num_blocks = kv_caches[0].shape[0]
    bad = [b for b in dst_block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"destination block id {bad[0]} is outside this worker's {num_blocks} blocks")
    req = kv_pb2.PullBlocksRequest(request_id=request_id, block_ids=list(src_block_ids),
                                   blocks_per_chunk=blocks_per_chunk_)
    call = stub.PullBlocks(req, timeout=timeout_s)
    received = nbytes = 0
    try:
        async for chunk in call:
            n = chunk.num_blocks
            if chunk.offset != received or n == 0 or received + n > len(dst_block_ids):
                raise ValueError(f"malformed PullBlocks stream: chunk at offset {chunk.offset} with {n} blocks "
                                 f"after {received} of {len(dst_block_ids)} blocks")
            bytes_to_blocks(kv_caches, dst_block_ids[received : received + n], chunk.data)
            received += n
            nbytes += len(chunk.data)
    except BaseException:
        call.cancel()
        raise
    if received != len(dst_block_ids):
        raise ValueError(f"PullBlocks stream ended after {received} of {len(dst_block_ids)} blocks")
    return nbytes
