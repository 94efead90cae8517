"""NIXL transport: one agent per worker, shared by its serving side (NixlSource) and reading side
(NixlReader).

The agent runs without NIXL's progress thread (it busy-polls a whole core even when idle) and
without the listener thread (metadata travels in the KV Handshake RPC). Progress is driven from
the worker's event loop instead:
- the reader polls `check_xfer_state` with short asyncio sleeps until its READ is done;
- the serving side must progress while a peer connects (UCX wire-up needs both sides) and while a
  READ may be in flight: UCX finishes wire-up lazily (seen here: READs right after the warm-up
  hang until the target progresses) and tcp across hosts is not one-sided. A pump task polls the
  agent every few ms for as long as some key wants progress (handshake -> warm-up notification,
  ExtendLease -> Release), then exits, so an idle worker spends no CPU here.
Every call into the agent happens on the event loop thread (the agent is created thread-unsafe).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pdserve.v1 import kv_pb2

logger = logging.getLogger(__name__)

PUMP_INTERVAL_S = 0.002
MAX_POLL_DELAY_S = 0.002
WARMUP_BYTES = 64
WARM_NOTIF = b"pdserve:warm:"  # + reader worker id: its warm-up READ is done, stop the handshake window


class NixlTransferError(RuntimeError):
    """A NIXL transfer failed, timed out, or could not be set up."""


def handshake_progress_key(reader_worker_id: str) -> str:
    return f"handshake:{reader_worker_id}"


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both sides are consecutive: one descriptor each."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([int(s), int(d), 1])
    return [(s, d, n) for s, d, n in runs]


def _descs(bases: Sequence[int], starts: np.ndarray, counts: np.ndarray, block_bytes: int) -> np.ndarray:
    """Nx3 (addr, len, dev) rows, layer-major: the same runs on every layer's region."""
    base = np.asarray(bases, dtype=np.uint64)[:, None]
    addr = base + starts.astype(np.uint64)[None, :] * np.uint64(block_bytes)
    length = np.broadcast_to(counts.astype(np.uint64)[None, :] * np.uint64(block_bytes), addr.shape)
    out = np.zeros((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.reshape(-1)
    out[:, 1] = length.reshape(-1)
    return out


class NixlAgentWrapper:
    """The worker's agent with its KV region registered once, plus the progress pump."""

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], *, pump_interval_s: float = PUMP_INTERVAL_S) -> None:
        from nixl._api import nixl_agent, nixl_agent_config  # heavy import, only where NIXL is used

        if not kv_caches or any(not t.is_contiguous() or t.device.type != "cpu" for t in kv_caches):
            raise ValueError("NIXL needs one contiguous CPU tensor per layer")
        # TODO(gpu): VRAM regions register the same way (mem type from the tensor); untested here.
        cfg = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"])
        self.agent: Any = nixl_agent(name, cfg)
        self.name = name
        self.pump_interval_s = pump_interval_s
        self._regs = [self.agent.register_memory(list(kv_caches))]
        # Warm-up reads land here, never in the KV cache (block 0 may belong to a live request).
        self.scratch = torch.zeros(WARMUP_BYTES, dtype=torch.uint8)
        self._regs.append(self.agent.register_memory(self.scratch))
        self.metadata: bytes = self.agent.get_agent_metadata()
        self.layer_addrs = tuple(int(t.data_ptr()) for t in kv_caches)
        self.block_bytes = int(kv_caches[0][0].numel() * kv_caches[0].element_size())
        self.num_blocks = int(kv_caches[0].shape[0])
        self._want: dict[str, float] = {}  # key -> monotonic deadline
        self._pump_task: asyncio.Task | None = None
        self._closed = False

    # ----- progress -----
    def keep_progress(self, key: str, seconds: float) -> None:
        """Progress the agent for up to `seconds` (or until stop_progress(key))."""
        if self._closed:
            return
        deadline = time.monotonic() + seconds
        self._want[key] = max(self._want.get(key, 0.0), deadline)
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump(), name=f"nixl-pump-{self.name}")

    def stop_progress(self, key: str) -> None:
        self._want.pop(key, None)

    @property
    def pumping(self) -> bool:
        return self._pump_task is not None and not self._pump_task.done()

    async def _pump(self) -> None:
        while True:
            now = time.monotonic()
            self._want = {k: d for k, d in self._want.items() if d > now}
            if not self._want:
                return  # nothing wants progress: no task, no CPU
            try:
                self._on_notifs(self.agent.get_new_notifs())  # also progresses the UCX workers
            except Exception as exc:  # noqa: BLE001 - a broken peer must not kill the pump
                logger.warning("NIXL progress on %s failed: %s", self.name, exc)
            await asyncio.sleep(self.pump_interval_s)

    def _on_notifs(self, notifs: dict[str, list[bytes]]) -> None:
        for msgs in notifs.values():
            for msg in msgs:
                if msg.startswith(WARM_NOTIF):
                    self.stop_progress(handshake_progress_key(msg[len(WARM_NOTIF) :].decode(errors="replace")))

    # ----- transfers -----
    async def run_xfer(self, handle: Any, deadline: float, what: str) -> None:
        """Post a prepared transfer and poll it to completion; always releases the handle."""
        try:
            state = self.agent.transfer(handle)
            delay = 0.0
            while state == "PROC":
                if time.monotonic() >= deadline:
                    raise NixlTransferError(f"{what} timed out")
                await asyncio.sleep(delay)
                delay = min(MAX_POLL_DELAY_S, delay * 2 if delay else 50e-6)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlTransferError(f"{what} failed (transfer state {state})")
        except NixlTransferError:
            raise
        except Exception as exc:  # the bindings raise their own types (e.g. NIXL_ERR_REMOTE_DISCONNECT)
            raise NixlTransferError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            try:
                handle.release()
            except Exception as exc:  # noqa: BLE001 - an in-flight handle may refuse to cancel
                logger.error("releasing NIXL transfer handle (%s) failed: %s", what, exc)

    def close(self) -> None:
        self._closed = True
        if self._pump_task is not None:
            self._pump_task.cancel()
        self._want.clear()
        for reg in self._regs:
            try:
                self.agent.deregister_memory(reg)
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                logger.warning("NIXL deregister on %s failed: %s", self.name, exc)
        self._regs.clear()


class NixlSource:
    """The serving side's view of the agent: what a Handshake hands to readers."""

    def __init__(self, wrapper: NixlAgentWrapper) -> None:
        self.wrapper = wrapper

    @property
    def name(self) -> str:
        return self.wrapper.name

    @property
    def metadata(self) -> bytes:
        return self.wrapper.metadata

    @property
    def layer_base_addresses(self) -> tuple[int, ...]:
        return self.wrapper.layer_addrs

    def keep_progress(self, key: str, seconds: float) -> None:
        self.wrapper.keep_progress(key, seconds)

    def stop_progress(self, key: str) -> None:
        self.wrapper.stop_progress(key)


@dataclass(frozen=True)
class RemoteRegion:
    layer_addrs: tuple[int, ...]
    block_bytes: int
    num_blocks: int


class NixlReader:
    """One-sided READs of a peer's KV blocks into this worker's own registered KV region."""

    def __init__(self, wrapper: NixlAgentWrapper) -> None:
        self.wrapper = wrapper
        self._peers: dict[str, RemoteRegion] = {}

    def add_peer(self, resp: kv_pb2.HandshakeResponse) -> str:
        """Load the peer's agent metadata; returns its agent name."""
        w = self.wrapper
        if resp.block_bytes != w.block_bytes or len(resp.layer_base_addresses) != len(w.layer_addrs):
            raise NixlTransferError(
                f"peer {resp.worker_id} has {len(resp.layer_base_addresses)} layers of {resp.block_bytes}-byte "
                f"blocks, this worker {len(w.layer_addrs)} of {w.block_bytes}")
        raw = w.agent.add_remote_agent(resp.nixl_agent_metadata)
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._peers[name] = RemoteRegion(tuple(resp.layer_base_addresses), int(resp.block_bytes), int(resp.num_blocks))
        return name

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            try:
                self.wrapper.agent.remove_remote_agent(name)
            except Exception as exc:  # noqa: BLE001 - the peer may be gone already
                logger.info("removing NIXL peer %s: %s", name, exc)

    def _region(self, name: str) -> RemoteRegion:
        region = self._peers.get(name)
        if region is None:
            raise NixlTransferError(f"NIXL peer {name!r} is not connected (no handshake)")
        return region

    async def warm_up(self, name: str, timeout_s: float, reader_worker_id: str) -> float:
        """A tiny READ that pays the connection set-up off the request path; returns its seconds.

        Then tells the peer (a NIXL notification) that it may stop progressing for us.
        """
        region, w = self._region(name), self.wrapper
        local = w.agent.get_xfer_descs(np.array([[w.scratch.data_ptr(), WARMUP_BYTES, 0]], dtype=np.uint64), "DRAM")
        remote = w.agent.get_xfer_descs(np.array([[region.layer_addrs[0], WARMUP_BYTES, 0]], dtype=np.uint64), "DRAM")
        t0 = time.monotonic()
        handle = w.agent.initialize_xfer("READ", local, remote, name)
        await w.run_xfer(handle, t0 + timeout_s, f"NIXL warm-up read from {name}")
        seconds = time.monotonic() - t0
        try:
            w.agent.send_notif(name, WARM_NOTIF + reader_worker_id.encode())
        except Exception as exc:  # noqa: BLE001 - only shortens the peer's progress window
            logger.info("NIXL warm-up notification to %s failed: %s", name, exc)
        return seconds

    async def read(self, name: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int], timeout_s: float) -> int:
        """READ the peer's `src_block_ids` (every layer) into local `dst_block_ids`; returns bytes moved."""
        region, w = self._region(name), self.wrapper
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks")
        if not src_block_ids:
            return 0
        _check_ids(src_block_ids, region.num_blocks, f"peer {name}")
        _check_ids(dst_block_ids, w.num_blocks, "this worker")
        runs = np.asarray(block_runs(src_block_ids, dst_block_ids), dtype=np.int64)
        counts = runs[:, 2]
        remote = w.agent.get_xfer_descs(_descs(region.layer_addrs, runs[:, 0], counts, w.block_bytes), "DRAM")
        local = w.agent.get_xfer_descs(_descs(w.layer_addrs, runs[:, 1], counts, w.block_bytes), "DRAM")
        t0 = time.monotonic()
        try:
            handle = w.agent.initialize_xfer("READ", local, remote, name)
        except Exception as exc:
            raise NixlTransferError(f"NIXL read set-up from {name} failed: {type(exc).__name__}: {exc}") from exc
        await w.run_xfer(handle, t0 + timeout_s, f"NIXL read of {len(src_block_ids)} blocks from {name}")
        return len(src_block_ids) * len(w.layer_addrs) * w.block_bytes


def _check_ids(ids: Sequence[int], num_blocks: int, whose: str) -> None:
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block id {bad[0]} is outside {whose}'s {num_blocks} blocks")
