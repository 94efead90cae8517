"""A prefill peer in its own process, for KV transfer tests and benchmarks (PeerProcess drives it).

Run as a script, it serves the KV gRPC service (with a NIXL source) over an engine and takes commands as JSON
lines on stdin, answering one JSON line each on stdout (logs go to stderr):
  {"cmd": "prefill", "id": ..., "prompt": [...]} -> {"handle": base64 KVHandle, "first_token": t}
  {"cmd": "reap", "advance": s}                   -> {"expired": n}  (reap as if s seconds later)
  {"cmd": "state"}                                -> {"leaks": [...], "leases": n, "counters": {...},
                                                      "pumping": bool, "cpu_seconds": f}
  {"cmd": "exit"}
Startup prints {"ready": true, "address": "127.0.0.1:PORT", "pid": PID}.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

from cluster.kv.counters import KVCounters
from cluster.kv.layout import KVLayout
from cluster.kv.leases import LeaseTable
from cluster.kv.nixl_transport import NixlAgentWrapper, NixlSource
from cluster.kv.service import KVServicer
from cluster.rpc import GRPC_OPTIONS
from engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.v1 import kv_pb2, kv_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.engine = LLMEngine.from_args(args.model, dtype=args.dtype, block_size=args.block_size,
                                          num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                                          load_tokenizer_=False)
        self.layout = KVLayout.from_engine_config(self.engine.config)
        self.worker_id = args.worker_id
        self.leases = LeaseTable(args.lease_seconds)
        self.counters = KVCounters()
        caches = self.engine.runner.kv_caches
        self.nixl = NixlAgentWrapper(f"{self.worker_id}-{os.getpid()}", caches)
        self.servicer = KVServicer(self.worker_id, self.layout, caches, self.leases, self._release, self.counters,
                                   NixlSource(self.nixl))
        self.address = ""

    async def _release(self, request_id: str) -> None:
        try:
            self.engine.release_kv(request_id)
        except ValueError:
            pass

    def prefill(self, rid: str, prompt: list[int]) -> dict:
        self.engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=64), hold_kv=True)
        last = None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                last = out
        assert last is not None and last.kv_held, "prefill did not end holding its KV"
        blocks = self.engine.held_kv_blocks(rid)
        expiry = self.leases.add(rid, blocks, len(prompt), time.time())
        handle = kv_pb2.KVHandle(worker_id=self.worker_id, kv_address=self.address, request_id=rid,
                                 block_ids=blocks, num_tokens=len(prompt), layout_hash=self.layout.hash(),
                                 lease_expiry_unix=expiry, transport="nixl")
        return {"handle": base64.b64encode(handle.SerializeToString()).decode(),
                "first_token": last.outputs[0].token_ids[0]}

    async def handle(self, msg: dict) -> dict:
        cmd = msg["cmd"]
        if cmd == "prefill":
            return self.prefill(msg["id"], msg["prompt"])
        if cmd == "reap":
            return {"expired": await self.servicer.reap(time.time() + float(msg.get("advance", 0.0)))}
        if cmd == "state":
            return {"leaks": self.engine.leaks(), "leases": len(self.leases), "counters": self.counters.as_dict(),
                    "pumping": self.nixl.pumping, "cpu_seconds": _cpu_seconds()}
        raise ValueError(f"unknown command {cmd!r}")


async def main(args: argparse.Namespace) -> None:
    peer = Peer(args)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    kv_pb2_grpc.add_KVServicer_to_server(peer.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    peer.address = f"127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _reply({"ready": True, "address": peer.address, "pid": os.getpid()})
    while True:
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        if msg.get("cmd") == "exit":
            break
        try:
            _reply(await peer.handle(msg))
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            _reply({"error": f"{type(exc).__name__}: {exc}"})
    await server.stop(grace=0.5)
    peer.nixl.close()


class PeerProcess:
    """Driver for this script run as a subprocess (used by the tests and the benchmark)."""

    def __init__(self, checkpoint: Path | None, name: str, log_dir: Path, **opts) -> None:
        args = [sys.executable, str(Path(__file__).resolve()), "--worker-id", name]
        if checkpoint is not None:  # None: the default model
            args += ["--model", str(checkpoint)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = ""
        self.pid = self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # EOF: the peer exited

    def _read(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.pid} did not answer in {timeout}s (see {self.log.name})") from None
        if not line:
            raise AssertionError(f"peer {self.pid} exited with {self.proc.wait()} (see {self.log.name})")
        return json.loads(line)

    def wait_ready(self, timeout: float = 60.0) -> None:
        msg = self._read(timeout)
        assert msg.get("ready"), msg
        self.address = msg["address"]

    def call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read(30.0)
        assert "error" not in reply, reply["error"]
        return reply

    def prefill(self, rid: str, prompt: list[int]) -> tuple[kv_pb2.KVHandle, int]:
        reply = self.call(cmd="prefill", id=rid, prompt=prompt)
        return kv_pb2.KVHandle.FromString(base64.b64decode(reply["handle"])), reply["first_token"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


_OUT = sys.stdout  # the command channel; replaced in __main__ so library logs cannot corrupt it


def _reply(obj: dict) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="checkpoint folder (default: the default model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--lease-seconds", type=float, default=30.0)
    p.add_argument("--worker-id", default="prefill-peer")
    args = p.parse_args()
    # NIXL and UCX log to stdout: keep the real stdout for replies, send everything else to stderr.
    _OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s peer %(name)s %(message)s")
    asyncio.run(main(args))
