"""The KV gRPC service a prefill (or mixed) worker serves: Handshake, PullBlocks, ExtendLease, Release.

All handlers run on the worker's event loop; the lease table is only touched there, so checking a
lease and copying its blocks with no await in between cannot race the reaper. Blocks are unpinned
only through `release_blocks` (the worker hops to its engine thread), exactly once per lease:
whoever removes the lease from the table (Release or `reap`) calls it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import torch

from cluster.kv.counters import KVCounters
from cluster.kv.grpc_transport import blocks_per_chunk, blocks_to_bytes
from cluster.kv.layout import KV_PROTOCOL_VERSION, KVLayout
from cluster.kv.leases import LeaseTable
from cluster.kv.nixl_transport import NixlSource, handshake_progress_key
from pdserve.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)

# Progress window for the reader's warm-up READ (connection set-up); the reader's notification
# after it ends the window early.
HANDSHAKE_PROGRESS_S = 5.0
READ_PROGRESS_S = 10.0  # cap on the progress window between ExtendLease and Release


def check_kv_caches(layout: KVLayout, kv_caches: Sequence[torch.Tensor]) -> None:
    """ValueError unless the tensors are the layout's per-layer [num_blocks, 2, bs, kvh, hd] caches."""
    shape = (2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    if len(kv_caches) != layout.num_layers:
        raise ValueError(f"layout has {layout.num_layers} layers but {len(kv_caches)} KV tensors were given")
    for i, t in enumerate(kv_caches):
        if tuple(t.shape[1:]) != shape or str(t.dtype).removeprefix("torch.") != layout.dtype or not t.is_contiguous():
            raise ValueError(f"KV tensor {i} is {tuple(t.shape)} {t.dtype} (contiguous={t.is_contiguous()}); "
                             f"layout needs [num_blocks, {', '.join(map(str, shape))}] {layout.dtype}")
        if t.shape[0] != kv_caches[0].shape[0]:
            raise ValueError("every layer's KV tensor must have the same number of blocks")


def layout_difference(ours: str, theirs: str) -> str:
    """'block_size: peer 8, this worker 16; ...' from two KVLayout.describe() strings."""
    a = dict(p.split("=", 1) for p in ours.split() if "=" in p)
    b = dict(p.split("=", 1) for p in theirs.split() if "=" in p)
    diffs = [f"{k}: peer {b.get(k, '?')}, this worker {a.get(k, '?')}" for k in {**a, **b} if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "the descriptions agree but the hashes differ"


class KVServicer(kv_pb2_grpc.KVServicer):
    def __init__(
        self,
        worker_id: str,
        layout: KVLayout,
        kv_caches: list[torch.Tensor],
        leases: LeaseTable,
        release_blocks: Callable[[str], Awaitable[None]],
        counters: KVCounters,
        nixl: NixlSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_kv_caches(layout, kv_caches)
        self.worker_id = worker_id
        self.layout = layout
        self.kv_caches = kv_caches
        self.leases = leases
        self.release_blocks = release_blocks
        self.counters = counters
        self.nixl = nixl
        self.clock = clock
        self._hash = layout.hash()

    # ----- RPCs -----
    async def Handshake(self, request: kv_pb2.HandshakeRequest, context: grpc.aio.ServicerContext) -> kv_pb2.HandshakeResponse:
        if request.protocol_version != KV_PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV protocol version mismatch: peer {request.worker_id} speaks "
                                f"{request.protocol_version}, worker {self.worker_id} speaks {KV_PROTOCOL_VERSION}")
        if request.layout_hash != self._hash:
            ours = self.layout.describe()
            msg = (f"KV layout mismatch ({layout_difference(ours, request.layout_description)}): "
                   f"peer {request.worker_id} has [{request.layout_description}] (hash {request.layout_hash}), "
                   f"worker {self.worker_id} has [{ours}] (hash {self._hash})")
            logger.error("handshake refused: %s", msg)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)
        first = self.kv_caches[0]
        resp = kv_pb2.HandshakeResponse(
            protocol_version=KV_PROTOCOL_VERSION, layout_hash=self._hash, worker_id=self.worker_id,
            layout_description=self.layout.describe(),
            layer_base_addresses=[t.data_ptr() for t in self.kv_caches],
            block_bytes=first[0].numel() * first.element_size(), num_blocks=first.shape[0],
        )
        if self.nixl is not None and request.transport == "nixl":
            resp.nixl_agent_name = self.nixl.name
            resp.nixl_agent_metadata = self.nixl.metadata
            # The reader's warm-up READ follows at once; UCX wire-up needs this side to progress.
            self.nixl.keep_progress(handshake_progress_key(request.worker_id), HANDSHAKE_PROGRESS_S)
        logger.info("KV handshake from %s (%s) accepted by %s", request.worker_id, request.transport or "?",
                    self.worker_id)
        return resp

    async def PullBlocks(self, request: kv_pb2.PullBlocksRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[kv_pb2.BlockChunk]:
        rid = request.request_id
        lease = self.leases.get(rid)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._no_lease(rid))
        held = set(lease.block_ids)
        bad = [b for b in request.block_ids if b not in held]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"block {bad[0]} is not one of the {len(held)} blocks leased to request {rid}")
        ids = list(request.block_ids)
        per = blocks_per_chunk(self.kv_caches, request.blocks_per_chunk)
        for off in range(0, len(ids), per):
            # Checked (and extended) right before the copy, with no await in between: the blocks
            # cannot be unpinned under us.
            if self.leases.extend(rid, self.clock()) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, self._no_lease(rid) + " (expired while streaming)")
            part = ids[off : off + per]
            data = blocks_to_bytes(self.kv_caches, part)
            self.counters.blocks_served_total += len(part)
            yield kv_pb2.BlockChunk(offset=off, num_blocks=len(part), data=data)

    async def ExtendLease(self, request: kv_pb2.LeaseRequest, context: grpc.aio.ServicerContext) -> kv_pb2.LeaseResponse:
        rid = request.request_id
        now = self.clock()
        expiry = self.leases.extend(rid, now)
        if expiry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._no_lease(rid))
        if self.nixl is not None:
            # A READ follows; it can need this side to progress (lazy UCX wire-up, tcp across
            # hosts), so progress until Release (or the cap).
            self.nixl.keep_progress(f"lease:{rid}", min(READ_PROGRESS_S, expiry - now))
        return kv_pb2.LeaseResponse(ok=True, lease_expiry_unix=expiry)

    async def Release(self, request: kv_pb2.LeaseRequest, context: grpc.aio.ServicerContext) -> kv_pb2.LeaseResponse:
        rid = request.request_id
        if self.nixl is not None:
            self.nixl.stop_progress(f"lease:{rid}")
        lease = self.leases.get(rid)
        if lease is None or not self.leases.release(rid):
            logger.info("Release of %s from %s: no lease (expired or released)", rid, request.peer_worker_id)
            return kv_pb2.LeaseResponse(ok=False)
        # Shielded: a caller that gives up must not leave the blocks pinned.
        await asyncio.shield(self._release(rid))
        return kv_pb2.LeaseResponse(ok=True, lease_expiry_unix=lease.expiry)

    # ----- housekeeping (driven by the worker) -----
    async def reap(self, now: float) -> int:
        """Pop leases past their expiry and unpin their blocks; returns how many expired."""
        expired = self.leases.pop_expired(now)
        if not expired:
            return 0
        for rid in expired:
            logger.warning("KV lease for %s on %s expired before a Release; unpinning its blocks", rid, self.worker_id)
            if self.nixl is not None:
                self.nixl.stop_progress(f"lease:{rid}")
        self.counters.lease_expired_total += len(expired)
        await asyncio.shield(asyncio.gather(*(self._release(rid) for rid in expired)))
        return len(expired)

    async def _release(self, rid: str) -> None:
        try:
            await self.release_blocks(rid)
        except Exception:  # noqa: BLE001 - logged loudly; the engine's leak check will show it
            logger.exception("unpinning the blocks of %s on %s failed", rid, self.worker_id)

    def _no_lease(self, rid: str) -> str:
        return f"worker {self.worker_id} holds no KV lease for request {rid} (expired, released or unknown)"
