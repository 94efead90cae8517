"""KVReceiver: the decode side's KV client. Handshakes with prefill peers ahead of time, then per
request copies the blocks it lacks into its own cache (NIXL READ or gRPC PullBlocks) and releases
the lease on the peer. Every failure surfaces as KVTransferError within `timeout_s`.

Runs on the worker's event loop thread (it shares the NIXL agent with the worker's KVServicer).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import grpc
import torch

from cluster.kv.counters import KVCounters
from cluster.kv.grpc_transport import pull_blocks
from cluster.kv.layout import KV_PROTOCOL_VERSION, KVLayout
from cluster.kv.nixl_transport import NixlAgentWrapper, NixlReader, NixlSource, NixlTransferError
from cluster.kv.service import check_kv_caches
from cluster.rpc import GRPC_OPTIONS
from pdserve.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)

# Safety margin between the end of a NIXL READ and the lease expiry (clock skew, scheduling).
LEASE_MARGIN_S = 2.0

TRANSPORTS = ("nixl", "grpc")
_DROP_PEER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class KVTransferError(RuntimeError):
    """Moving a request's KV failed (peer gone, lease expired, timeout, transport error)."""


class KVLayoutMismatch(ValueError):
    """The peer's KV layout (or protocol version) differs; the message names both sides."""


@dataclass(frozen=True)
class Peer:
    address: str
    worker_id: str
    layout_hash: str
    nixl_name: str | None  # None: this peer's blocks come over gRPC
    channel: grpc.aio.Channel
    stub: kv_pb2_grpc.KVStub
    warmup_seconds: float = 0.0

    @property
    def transport(self) -> str:
        return "grpc" if self.nixl_name is None else "nixl"


@dataclass(frozen=True)
class TransferResult:
    num_blocks: int
    num_bytes: int
    seconds: float


class KVReceiver:
    def __init__(self, worker_id: str, layout: KVLayout, kv_caches: list[torch.Tensor], transport: str,
                 counters: KVCounters, timeout_s: float = 10.0) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"KV transport must be one of {TRANSPORTS}, got {transport!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        check_kv_caches(layout, kv_caches)
        self.worker_id = worker_id
        self.layout = layout
        self.kv_caches = kv_caches
        self.transport = transport
        self.counters = counters
        self.timeout_s = float(timeout_s)
        self._hash = layout.hash()
        self._peers: dict[str, Peer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wrapper: NixlAgentWrapper | None = None
        self._reader: NixlReader | None = None
        self.nixl_source: NixlSource | None = None  # the worker's KVServicer serves through this agent
        if transport == "nixl":
            # A fresh agent name per process: peers never confuse a restarted worker with the old one.
            self._wrapper = NixlAgentWrapper(f"{worker_id}-{uuid.uuid4().hex[:8]}", kv_caches)
            self._reader = NixlReader(self._wrapper)
            self.nixl_source = NixlSource(self._wrapper)

    @property
    def peers(self) -> dict[str, Peer]:
        return dict(self._peers)

    # ----- connecting -----
    async def handshake(self, address: str) -> Peer:
        """Connect to the KV service at `address` (cached); NIXL peers also get a warm-up READ."""
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        async with self._locks.setdefault(address, asyncio.Lock()):
            peer = self._peers.get(address)
            if peer is None:
                peer = await self._connect(address)
                self._peers[address] = peer
            return peer

    async def _connect(self, address: str) -> Peer:
        channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        stub = kv_pb2_grpc.KVStub(channel)
        req = kv_pb2.HandshakeRequest(protocol_version=KV_PROTOCOL_VERSION, layout_hash=self._hash,
                                      worker_id=self.worker_id, transport=self.transport,
                                      layout_description=self.layout.describe())
        nixl_name = None
        try:
            try:
                resp = await stub.Handshake(req, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise KVLayoutMismatch(exc.details()) from None
                raise KVTransferError(f"KV handshake with {address} failed: {exc.code().name}: {exc.details()}") from None
            if resp.layout_hash != self._hash:  # a peer that should have refused: never move its bytes
                raise KVLayoutMismatch(f"peer {resp.worker_id} at {address} has [{resp.layout_description}], "
                                       f"this worker [{self.layout.describe()}]")
            warm = 0.0
            if self._reader is not None and resp.nixl_agent_name:
                try:
                    nixl_name = self._reader.add_peer(resp)
                    warm = await self._reader.warm_up(nixl_name, self.timeout_s, self.worker_id)
                except Exception as exc:  # the bindings raise their own error types
                    raise KVTransferError(f"NIXL connection to {resp.worker_id} at {address} failed: {exc}") from exc
            elif self._reader is not None:
                logger.warning("KV peer %s at %s offers no NIXL agent; its KV will come over gRPC",
                               resp.worker_id, address)
        except BaseException:
            if nixl_name is not None and self._reader is not None:
                self._reader.remove_peer(nixl_name)
            await channel.close()
            raise
        logger.info("KV peer %s at %s connected over %s (warm-up %.1f ms)", resp.worker_id, address,
                    "nixl" if nixl_name else "grpc", warm * 1e3)
        return Peer(address, resp.worker_id, resp.layout_hash, nixl_name, channel, stub, warm)

    async def forget(self, address: str) -> None:
        """Drop a peer's cached connection (it restarted, died, or failed a transfer)."""
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        if self._tasks:  # let Releases already sent on this channel arrive before closing it
            await asyncio.wait(list(self._tasks), timeout=1.0)
        if peer.nixl_name is not None and self._reader is not None:
            self._reader.remove_peer(peer.nixl_name)
        await peer.channel.close()

    # ----- moving one request's KV -----
    async def fetch(self, handle: kv_pb2.KVHandle, dst_block_ids: Sequence[int], num_skip_blocks: int) -> TransferResult:
        """Copy handle.block_ids[num_skip_blocks:] into dst_block_ids[num_skip_blocks:], then Release."""
        t0 = time.monotonic()
        try:
            num_blocks, num_bytes = await self._fetch(handle, list(dst_block_ids), num_skip_blocks, t0 + self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.failures_total += 1
            if isinstance(exc, KVTransferError):
                raise
            raise KVTransferError(f"KV fetch of {handle.request_id} from {handle.kv_address} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        seconds = time.monotonic() - t0
        self.counters.transfers_total += 1
        self.counters.transfer_bytes_total += num_bytes
        self.counters.transfer_seconds_total += seconds
        self.counters.blocks_skipped_total += num_skip_blocks
        return TransferResult(num_blocks, num_bytes, seconds)

    async def _fetch(self, handle: kv_pb2.KVHandle, dst: list[int], skip: int, deadline: float) -> tuple[int, int]:
        rid, address = handle.request_id, handle.kv_address
        if handle.layout_hash != self._hash:
            raise KVTransferError(f"KV handle of {rid} has layout {handle.layout_hash}, this worker "
                                  f"{self._hash} ({self.layout.describe()})")
        if len(dst) != len(handle.block_ids) or not 0 <= skip <= len(dst):
            raise KVTransferError(f"KV handle of {rid} has {len(handle.block_ids)} blocks; got {len(dst)} "
                                  f"destination blocks and {skip} to skip")
        src, dst = list(handle.block_ids)[skip:], dst[skip:]
        peer = self._peers.get(address)
        if peer is not None and handle.worker_id and peer.worker_id != handle.worker_id:
            await self.forget(address)  # another worker now serves that address
        try:
            peer = await asyncio.wait_for(self.handshake(address), _left(deadline, rid))
        except asyncio.TimeoutError:
            raise KVTransferError(f"KV handshake with {address} for {rid} timed out") from None
        except KVLayoutMismatch as exc:
            raise KVTransferError(str(exc)) from exc
        lease_req = kv_pb2.LeaseRequest(request_id=rid, peer_worker_id=self.worker_id)
        try:
            nbytes = 0
            confirmed = True  # the data is known good without waiting for Release's answer
            if src and peer.nixl_name is not None:
                extended = await peer.stub.ExtendLease(lease_req, timeout=_left(deadline, rid))
                nbytes = await self._reader.read(peer.nixl_name, src, dst, _left(deadline, rid))
                # A one-sided READ that ended well inside the extended lease read pinned blocks; only
                # a READ that ran close to the expiry needs Release's verdict on the request path.
                confirmed = time.time() < extended.lease_expiry_unix - LEASE_MARGIN_S
            elif src:
                nbytes = await pull_blocks(peer.stub, rid, src, dst, self.kv_caches, _left(deadline, rid))
            if confirmed:
                # Off the request path: the peer unpins when it arrives (or at lease expiry).
                self._spawn(self._release_quietly(peer, lease_req, time.monotonic() + 5.0))
                return len(src), nbytes
            released = await peer.stub.Release(lease_req, timeout=_left(deadline, rid))
        except asyncio.CancelledError:
            self._spawn(self._release_quietly(peer, lease_req, time.monotonic() + 1.0))
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _DROP_PEER_CODES:
                await self.forget(address)
            elif exc.code() != grpc.StatusCode.NOT_FOUND:
                await self._release_quietly(peer, lease_req, deadline)
            raise KVTransferError(_rpc_message(exc, rid, peer)) from None
        except NixlTransferError as exc:
            await self._release_quietly(peer, lease_req, deadline)
            await self.forget(address)  # the connection may be broken: reconnect next time
            raise KVTransferError(f"KV read of {rid} from {peer.worker_id}: {exc}") from exc
        except Exception:
            await self._release_quietly(peer, lease_req, deadline)
            raise
        if not released.ok:
            if peer.nixl_name is not None and src:
                # The lease ended before the READ was confirmed: the blocks may have been reused.
                raise KVTransferError(f"KV lease of {rid} on {peer.worker_id} ended before Release; the data read "
                                      "may be stale")
            logger.warning("Release of %s on %s: the lease had already ended", rid, peer.worker_id)
        return len(src), nbytes

    async def _release_quietly(self, peer: Peer, req: kv_pb2.LeaseRequest, deadline: float) -> None:
        """Best effort: we gave up on these blocks, so the peer can unpin them before the lease ends."""
        try:
            await peer.stub.Release(req, timeout=min(1.0, max(0.05, deadline - time.monotonic())))
        except Exception as exc:  # noqa: BLE001 - the lease expiry frees them anyway
            logger.info("Release of %s on %s after a failure: %s", req.request_id, peer.worker_id, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:  # best-effort Releases still on their way (each bounded to ~1 s)
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for address in list(self._peers):
            await self.forget(address)
        if self._wrapper is not None:
            self._wrapper.close()
            self._wrapper = None


def _left(deadline: float, rid: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise KVTransferError(f"KV fetch of {rid} timed out")
    return left


def _rpc_message(exc: grpc.aio.AioRpcError, rid: str, peer: Peer) -> str:
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return f"KV lease of {rid} on {peer.worker_id} expired or is unknown: {exc.details()}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"KV fetch of {rid} from {peer.worker_id} at {peer.address} timed out"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"KV peer {peer.worker_id} at {peer.address} is unavailable: {exc.details()}"
    return f"KV fetch of {rid} from {peer.worker_id} failed: {code.name}: {exc.details()}"
