"""The router's added latency: the same 1-token request through the HTTP router vs a direct
gRPC call to the worker it would use (one mixed worker, so no KV transfer on either path).

Both paths run interleaved in one session against one warm worker, from a client process of its
own (as real clients are: sharing the router's process and GIL would add the client's own work to
the router's); prints medians and the difference. The router path includes HTTP, JSON, auth,
tokenization and worker selection.

    .venv/bin/python benchmarks/router_overhead.py --iterations 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import httpx  # noqa: E402

from cluster.config import ClusterConfig, EngineArgs  # noqa: E402
from cluster.launch import ServeSession  # noqa: E402
from pdserve.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

PROMPT = "The capital of France is"


async def measure(url: str, worker: str, model: str, token_ids: list[int], n: int) -> tuple[list[float], list[float]]:
    direct, routed = [], []
    async with grpc.aio.insecure_channel(worker) as ch, httpx.AsyncClient(timeout=60) as http:
        stub = worker_pb2_grpc.WorkerStub(ch)
        for i in range(n + 5):
            t0 = time.perf_counter()
            req = worker_pb2.GenerateRequest(request_id=f"d{i}", prompt_token_ids=token_ids,
                                             params=worker_pb2.SamplingParams(max_tokens=1, temperature=0))
            async for _ in stub.Generate(req):
                pass
            t1 = time.perf_counter()
            r = await http.post(f"{url}/v1/completions",
                                json={"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            r.raise_for_status()
            t2 = time.perf_counter()
            if i >= 5:  # warm-up
                direct.append((t1 - t0) * 1e3)
                routed.append((t2 - t1) * 1e3)
    return direct, routed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--measure", nargs=4, metavar=("URL", "WORKER", "MODEL", "IDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the client process
        url, worker, model, ids = args.measure
        print(json.dumps(asyncio.run(measure(url, worker, model, json.loads(ids), args.iterations))))
        return
    logging.basicConfig(level=logging.WARNING)
    session = ServeSession(ClusterConfig(engine=EngineArgs(num_kv_blocks=128), mixed=1, prefill=0, decode=0, port=0))
    try:
        url = session.start()
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        tok = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": PROMPT}).json()["tokens"]
        client = subprocess.run([sys.executable, __file__, "--iterations", str(args.iterations), "--measure", url,
                                 session.workers[0]["address"], model, json.dumps(tok)],
                                check=True, capture_output=True, text=True)
        direct, routed = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        session.stop()
    d, r = statistics.median(direct), statistics.median(routed)
    diffs = sorted(b - a for a, b in zip(direct, routed))
    print(f"{args.iterations} interleaved 1-token requests ({len(tok)} prompt tokens, prefix-cached after the first)")
    print(f"direct gRPC to the worker: median {d:.2f} ms")
    print(f"through the HTTP router:   median {r:.2f} ms")
    print(f"router overhead: median of paired differences {statistics.median(diffs):.2f} ms "
          f"(p90 {diffs[int(0.9 * len(diffs))]:.2f} ms); ratio {r / d:.2f}x")


if __name__ == "__main__":
    main()
