"""KV transfer between two processes over real NIXL and real gRPC.

A prefill peer (tests/integration/kv_peer.py: engine + KVServicer + NixlSource) runs in its own
process; the decode side (KVReceiver over its own engine of the same checkpoint) runs here. The
imported KV must give the same greedy tokens as one engine doing the whole request.
"""
from __future__ import annotations

import asyncio
import os
import random
import time

import grpc
import pytest

from cluster.kv.counters import KVCounters
from cluster.kv.layout import KVLayout
from cluster.kv.receiver import KVLayoutMismatch, KVReceiver, KVTransferError
from engine.sampling_params import SamplingParams
from pdserve.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import run_to_completion
from tests.integration.kv_peer import PeerProcess

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
_rng = random.Random(7)
PROMPT_A = [_rng.randrange(256) for _ in range(40)]  # 3 blocks of 16: two full, one partial
PROMPT_B = PROMPT_A[:32] + [_rng.randrange(256) for _ in range(9)]  # shares A's two full blocks
TINY_BLOCK_BYTES = 2 * 16 * 2 * 16 * 4  # [2, block 16, kv heads 2, head dim 16] float32
TINY_LAYERS = 3


@pytest.fixture(scope="module")
def peers(tiny_checkpoint, tmp_path_factory):
    """Two prefill peers started side by side: `main` for most tests, `doomed` to be killed."""
    path = tiny_checkpoint("llama")
    logs = tmp_path_factory.mktemp("kv_peers")
    started = {name: PeerProcess(path, name, logs) for name in ("main", "doomed")}
    try:
        for p in started.values():
            p.wait_ready()
        yield started
    finally:
        for p in started.values():
            p.close()


def _receiver(engine, transport: str, timeout_s: float = 10.0) -> tuple[KVReceiver, KVCounters]:
    counters = KVCounters()
    layout = KVLayout.from_engine_config(engine.config)
    return KVReceiver("decode-test", layout, engine.runner.kv_caches, transport, counters, timeout_s), counters


def _decode_rest(engine, rid: str) -> list[int]:
    (snap,) = engine.finish_kv_import(rid)
    tokens = list(snap.outputs[0].token_ids)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                tokens = list(out.outputs[0].token_ids)
    return tokens


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_transfer_gives_single_engine_tokens_and_skips_cached_prefix(transport, peers, tiny_checkpoint, make_engine):
    path = tiny_checkpoint("llama")
    expected_a, expected_b = run_to_completion(make_engine(path), [PROMPT_A, PROMPT_B], GREEDY)
    decode = make_engine(path)
    peer = peers["main"]
    before = peer.call(cmd="state")["counters"]

    async def scenario() -> None:
        rx, counters = _receiver(decode, transport)
        try:
            info = await rx.handshake(peer.address)
            assert info.transport == transport and info.worker_id == "main"
            assert (info.warmup_seconds > 0) == (transport == "nixl")
            assert await rx.handshake(peer.address) is info  # cached

            handle, first = await asyncio.to_thread(peer.prefill, f"{transport}-a", PROMPT_A)
            imp = decode.add_prefilled_request(handle.request_id, PROMPT_A, first, GREEDY)
            assert imp.num_cached_blocks == 0 and len(imp.block_ids) == len(handle.block_ids) == 3
            res = await rx.fetch(handle, imp.block_ids, imp.num_cached_blocks)
            assert (res.num_blocks, res.num_bytes) == (3, 3 * TINY_LAYERS * TINY_BLOCK_BYTES)
            assert _decode_rest(decode, handle.request_id) == expected_a

            # A dropped connection is rebuilt by the next fetch (a new NIXL connection for the same agent).
            await rx.forget(peer.address)
            assert rx.peers == {}

            # B shares A's two full blocks, now in this engine's prefix cache: only the tail moves.
            handle, first = await asyncio.to_thread(peer.prefill, f"{transport}-b", PROMPT_B)
            imp = decode.add_prefilled_request(handle.request_id, PROMPT_B, first, GREEDY)
            assert imp.num_cached_blocks == 2
            res_b = await rx.fetch(handle, imp.block_ids, imp.num_cached_blocks)
            assert (res_b.num_blocks, res_b.num_bytes) == (1, TINY_LAYERS * TINY_BLOCK_BYTES)
            assert res_b.num_bytes < res.num_bytes
            assert _decode_rest(decode, handle.request_id) == expected_b
            assert rx.peers[peer.address].transport == transport

            assert counters.transfers_total == 2 and counters.failures_total == 0
            assert counters.transfer_bytes_total == res.num_bytes + res_b.num_bytes
            assert counters.blocks_skipped_total == 2
            assert counters.transfer_seconds_total > 0
        finally:
            await rx.close()

    asyncio.run(scenario())
    state = peer.call(cmd="state")
    assert state["leaks"] == [] and state["leases"] == 0  # P unpinned both requests' blocks
    served = state["counters"]["blocks_served_total"] - before["blocks_served_total"]
    assert served == (4 if transport == "grpc" else 0)  # NIXL reads are one-sided


@pytest.mark.parametrize("kwargs, field", [({"block_size": 8}, "block_size"), ({"dtype": "bfloat16"}, "dtype")])
def test_layout_mismatch_fails_at_handshake(kwargs, field, peers, tiny_checkpoint, make_engine):
    decode = make_engine(tiny_checkpoint("llama"), **kwargs)
    peer = peers["main"]

    async def scenario() -> None:
        rx, counters = _receiver(decode, "nixl", timeout_s=5.0)
        try:
            t0 = time.monotonic()
            with pytest.raises(KVLayoutMismatch) as err:
                await rx.handshake(peer.address)
            assert time.monotonic() - t0 < 3.0
            msg = str(err.value)
            ours, theirs = rx.layout.describe(), KVLayout.from_engine_config(decode.config).describe()
            assert field in msg and ours in msg and "layers=3" in msg
            assert f"{field}: peer {getattr(rx.layout, field)}" in msg and theirs in msg
            assert rx.peers == {}
            # A handle from that peer is refused before any byte moves.
            handle = kv_pb2.KVHandle(worker_id="main", kv_address=peer.address, request_id="x", block_ids=[0],
                                     num_tokens=1, layout_hash="0" * 16)
            with pytest.raises(KVTransferError, match="layout"):
                await rx.fetch(handle, [0], 0)
            assert counters.failures_total == 1
        finally:
            await rx.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_expired_lease_fails_fetch_and_frees_prefill_blocks(transport, peers, tiny_checkpoint, make_engine):
    decode = make_engine(tiny_checkpoint("llama"))
    peer = peers["main"]
    expired_before = peer.call(cmd="state")["counters"]["lease_expired_total"]

    async def scenario() -> None:
        rx, counters = _receiver(decode, transport)
        try:
            await rx.handshake(peer.address)
            handle, first = await asyncio.to_thread(peer.prefill, f"{transport}-late", PROMPT_A)
            # The reaper runs as if the lease time (30 s) had passed.
            assert (await asyncio.to_thread(peer.call, cmd="reap", advance=60.0))["expired"] == 1
            imp = decode.add_prefilled_request(handle.request_id, PROMPT_A, first, GREEDY)
            with pytest.raises(KVTransferError, match="expired"):
                await rx.fetch(handle, imp.block_ids, imp.num_cached_blocks)
            decode.abort(handle.request_id)
            assert counters.failures_total == 1 and counters.transfers_total == 0
        finally:
            await rx.close()

    asyncio.run(scenario())
    state = peer.call(cmd="state")
    assert state["leaks"] == [] and state["leases"] == 0
    assert state["counters"]["lease_expired_total"] == expired_before + 1


def test_pull_and_release_status_codes(peers):
    peer = peers["main"]

    async def scenario() -> None:
        handle, _ = await asyncio.to_thread(peer.prefill, "codes", PROMPT_A)
        async with grpc.aio.insecure_channel(peer.address) as channel:
            stub = kv_pb2_grpc.KVStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.PullBlocks(kv_pb2.PullBlocksRequest(request_id="nope", block_ids=[0])):
                    pass
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            outside = next(b for b in range(64) if b not in handle.block_ids)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.PullBlocks(kv_pb2.PullBlocksRequest(request_id="codes", block_ids=[outside])):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ExtendLease(kv_pb2.LeaseRequest(request_id="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await stub.ExtendLease(kv_pb2.LeaseRequest(request_id="codes"))).ok
            assert (await stub.Release(kv_pb2.LeaseRequest(request_id="codes"))).ok
            assert not (await stub.Release(kv_pb2.LeaseRequest(request_id="codes"))).ok  # exactly once

    asyncio.run(scenario())
    assert peer.call(cmd="state")["leaks"] == []


def test_peer_gone_fails_within_timeout(peers, tiny_checkpoint, make_engine):
    decode = make_engine(tiny_checkpoint("llama"))
    peer = peers["doomed"]
    timeout = 3.0

    async def scenario() -> None:
        receivers = {t: _receiver(decode, t, timeout_s=timeout) for t in ("nixl", "grpc")}
        try:
            plans = {}
            for t, (rx, _) in receivers.items():
                await rx.handshake(peer.address)
                handle, first = await asyncio.to_thread(peer.prefill, f"gone-{t}", PROMPT_A if t == "nixl" else PROMPT_B)
                plans[t] = handle, decode.add_prefilled_request(handle.request_id, list(PROMPT_A if t == "nixl"
                                                                                         else PROMPT_B), first, GREEDY)
            await asyncio.to_thread(peer.kill)
            for t, (rx, counters) in receivers.items():
                handle, imp = plans[t]
                for _ in range(2):  # the cached connection, then a fresh handshake: both fail fast
                    t0 = time.monotonic()
                    with pytest.raises(KVTransferError):
                        await rx.fetch(handle, imp.block_ids, imp.num_cached_blocks)
                    assert time.monotonic() - t0 < timeout + 1.0
                assert counters.failures_total == 2 and rx.peers == {}
                decode.abort(handle.request_id)
        finally:
            for rx, _ in receivers.values():
                await rx.close()

    asyncio.run(scenario())


def test_idle_prefill_peer_uses_no_cpu(peers):
    peer = peers["main"]
    deadline = time.monotonic() + 15.0
    while peer.call(cmd="state")["pumping"]:  # the post-handshake progress window is bounded
        assert time.monotonic() < deadline, "NIXL progress pump never stopped"
        time.sleep(0.2)
    cpu0 = peer.call(cmd="state")["cpu_seconds"]
    time.sleep(1.0)
    assert peer.call(cmd="state")["cpu_seconds"] - cpu0 < 0.05
    threads = len(os.listdir(f"/proc/{peer.pid}/task"))
    assert threads < 40, threads  # no busy progress thread; grpc/UCX keep a few idle ones
