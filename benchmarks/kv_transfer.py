"""Benchmark: move the KV of a 256-token prompt of the default model between two processes.

Usage: python benchmarks/kv_transfer.py [--iters 30] [--fetch-iters 10] [--threads 1]
A prefill peer (tests/integration/kv_peer.py: engine + KV service + NIXL source) runs in its own
process; this process reads the prompt's 16 blocks (bf16, 30 layers) into its own KV cache. Prints
median milliseconds and the ratio to a local copy of the same bytes:
  memcpy        - export_blocks (index_select per layer) into a buffer, and a flat copy_ of it
  nixl read     - one NIXL READ of the blocks (descriptor per layer and run of blocks)
  grpc pull     - PullBlocks stream of ~1 MiB chunks, written into the cache
  fetch (nixl)  - KVReceiver.fetch: ExtendLease + READ (Release sent off the request path), what a request pays
  fetch (grpc)  - KVReceiver.fetch: PullBlocks + Release
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from cluster.kv.counters import KVCounters  # noqa: E402
from cluster.kv.grpc_transport import pull_blocks  # noqa: E402
from cluster.kv.layout import KVLayout  # noqa: E402
from cluster.kv.receiver import KVReceiver  # noqa: E402
from engine import LLMEngine  # noqa: E402
from pdserve.v1 import kv_pb2  # noqa: E402
from tests.integration.kv_peer import PeerProcess  # noqa: E402

PROMPT_TOKENS = 256


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


async def bench(args: argparse.Namespace, peer: PeerProcess, engine: LLMEngine) -> list[tuple[str, float, int]]:
    caches = engine.runner.kv_caches
    layout = KVLayout.from_engine_config(engine.config)
    prompt = [random.Random(0).randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]
    rows: list[tuple[str, float, int]] = []

    handle, _ = await asyncio.to_thread(peer.prefill, "raw", prompt)
    src = list(handle.block_ids)
    dst = list(range(len(src)))
    nbytes = len(src) * len(caches) * layout.block_bytes

    buf = engine.runner.export_blocks(src)
    flat = torch.empty_like(buf)
    t = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        engine.runner.export_blocks(src, out=buf)
        t.append(time.perf_counter() - t0)
    rows.append(("memcpy (index_select per layer)", median_ms(t), nbytes))
    t = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        flat.copy_(buf)
        t.append(time.perf_counter() - t0)
    rows.append(("memcpy (flat copy_)", median_ms(t), nbytes))

    nixl_rx = KVReceiver("bench-nixl", layout, caches, "nixl", KVCounters(), timeout_s=30)
    grpc_rx = KVReceiver("bench-grpc", layout, caches, "grpc", KVCounters(), timeout_s=30)
    try:
        info = await nixl_rx.handshake(peer.address)
        print(f"NIXL connection set-up (warm-up read at handshake): {info.warmup_seconds * 1e3:.1f} ms")
        ginfo = await grpc_rx.handshake(peer.address)
        reader = nixl_rx._reader  # the raw data path, without the lease RPCs around it
        # As in a fetch, ExtendLease opens the peer's progress window (capped at 10 s) for the READs.
        await info.stub.ExtendLease(kv_pb2.LeaseRequest(request_id="raw"))
        for name, step in (
            ("nixl read", lambda: reader.read(info.nixl_name, src, dst, 30.0)),
            ("grpc pull", lambda: pull_blocks(ginfo.stub, "raw", src, dst, caches, 30.0)),
        ):
            for _ in range(3):
                await step()
            t = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                moved = await step()
                t.append(time.perf_counter() - t0)
            assert moved == nbytes, (moved, nbytes)
            rows.append((name, median_ms(t), nbytes))
        await asyncio.to_thread(peer.call, cmd="reap", advance=3600.0)  # drop the raw lease

        for tag, name, rx in (("nixl", "fetch (nixl: ExtendLease+READ, Release async)", nixl_rx),
                              ("grpc", "fetch (grpc: Pull+Release)", grpc_rx)):
            t = []
            for i in range(args.fetch_iters):
                h, _ = await asyncio.to_thread(peer.prefill, f"{tag}-{i}", prompt)
                res = await rx.fetch(h, dst, 0)
                t.append(res.seconds)
            rows.append((name, median_ms(t), res.num_bytes))
    finally:
        await nixl_rx.close()
        await grpc_rx.close()
    state = await asyncio.to_thread(peer.call, cmd="state")
    assert state["leaks"] == [], state["leaks"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--fetch-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kv_bench_") as log_dir:
        peer = PeerProcess(None, "bench-prefill", Path(log_dir), dtype="bfloat16", num_kv_blocks=64, max_model_len=512)
        try:
            engine = LLMEngine.from_args(None, dtype="bfloat16", num_kv_blocks=64, max_model_len=512,
                                         load_tokenizer_=False)
            peer.wait_ready(120)
            rows = asyncio.run(bench(args, peer, engine))
        except BaseException:
            peer.close()
            print((Path(log_dir) / "bench-prefill.log").read_text()[-4000:], file=sys.stderr)
            raise
        peer.close()
    base = rows[0][1]
    layout = KVLayout.from_engine_config(engine.config)
    print(f"KV of a {PROMPT_TOKENS}-token prompt: {layout.describe()}, {rows[0][2] / 2**20:.2f} MiB; "
          f"{args.threads} thread(s) per process; medians")
    print(f"{'method':42s} {'ms':>8s} {'GB/s':>7s} {'x memcpy':>9s}")
    for name, ms, nbytes in rows:
        print(f"{name:42s} {ms:8.3f} {nbytes / ms / 1e6:7.2f} {ms / base:9.2f}")


if __name__ == "__main__":
    main()
