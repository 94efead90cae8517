"""Role switch latency (fence -> ready) with drain and with migration, and what one migration
costs a running sequence, on a 1 prefill + 2 decode cluster on this machine.

Every figure comes from the worker's own phase history (Health, via GET /admin/workers/{id}: the
unix time it entered each phase) and from the client's receive times (time.time(), same host):

- switch latency: the worker's `fenced` -> `ready`, and the phases in between;
- per-sequence migration time: the worker entering `migrating` (the moment it hands its streams
  back) -> the client receiving the first token resumed on the target worker (the chunk that ends
  the stream's longest gap after that moment): the router's resume, the target pulling the
  sequence's KV from the source (`migrate_kv`, the default) or recomputing prompt + generated
  tokens (`--kv recompute`), its first decode step, and the way back; the seam column is that
  gap as the client sees it (last token from the source -> first from the target), beside the
  stream's median inter-token gap. Both ways run by default, each on a fresh cluster; the
  workers' own counters (sequences_migrated_in_total, migration_recompute_total) are printed to
  show which way each run's sequences went.

To put the measured streams on one decode worker (D1), the other (D2) is switched to mixed while
they start (with prefill and decode workers present the router picks neither role from a mixed
one, so D2 neither prefills nor caches their prompts) and back to decode before D1 leaves; those
idle switches are timed too. Streams are
random token-id prompts (fresh per run: no prefix cache helps the resume), greedy, ignore_eos.

    .venv/bin/python benchmarks/role_switch.py --streams 4
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from cluster.config import ClusterConfig, EngineArgs  # noqa: E402
from cluster.launch import ServeSession  # noqa: E402

ADMIN = "bench-admin"


@dataclass
class Stream:
    prompt: list[int]
    max_tokens: int
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (received unix time, tokens so far)
    error: str = ""

    @property
    def tokens(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {ADMIN}"})
        import openai

        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.model = self.client.models.list().data[0].id

    def counter(self, name: str) -> float:
        """Sum over workers of a /metrics counter."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def worker(self, wid: str) -> dict:
        return self.http.get(f"{self.url}/admin/workers/{wid}").json()

    def ids(self) -> dict[str, str]:
        return {w["id"]: w["role"] for w in self.http.get(f"{self.url}/admin/workers").json()["data"]}

    def switch(self, wid: str, role: str, migrate: bool = False) -> dict:
        """Switch and wait until ready; returns {total_ms, phases: {phase: ms}}."""
        epoch = self.worker(wid)["epoch"]
        resp = self.http.post(f"{self.url}/admin/workers/{wid}/role",
                              json={"role": role, "expected_epoch": epoch, "migrate": migrate, "drain_timeout_s": 300})
        if resp.status_code != 202:
            raise RuntimeError(f"switch of {wid} to {role}: {resp.status_code} {resp.text}")
        deadline = time.monotonic() + 600
        while True:  # fenced when the POST answered: ready (or failed) again means it ended
            w = self.worker(wid)
            if w["phase"] in ("ready", "failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"switch of {wid} did not end: {w}")
            time.sleep(0.02)
        if (w["phase"], w["role"], w["epoch"]) != ("ready", role, epoch + 1):
            raise RuntimeError(f"switch of {wid} to {role} failed: {w.get('reason')}")
        hist = w["history"]
        start = max(i for i, e in enumerate(hist) if e["phase"] == "fenced")
        events = hist[start:]
        phases = {a["phase"]: (b["ts"] - a["ts"]) * 1e3 for a, b in zip(events, events[1:])}
        return {"total_ms": (events[-1]["ts"] - events[0]["ts"]) * 1e3, "phases": phases,
                "ts": {e["phase"]: e["ts"] for e in events}}

    def start(self, stream: Stream) -> threading.Thread:
        def run() -> None:
            try:
                out = self.client.completions.create(model=self.model, prompt=stream.prompt,
                                                     max_tokens=stream.max_tokens, temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True})
                n = 0
                for c in out:
                    if c.choices and c.choices[0].text:
                        n += 1  # a chunk; its token count comes from usage at the end
                        stream.chunks.append((time.time(), n))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                stream.error = f"{type(exc).__name__}: {exc}"

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def wait_for(cond, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def seam(stream: Stream, since: float) -> tuple[float, float, float, int]:
    """(hand-off -> first resumed chunk ms, seam gap ms, median gap ms, chunks before the seam)."""
    times = [t for t, _ in stream.chunks]
    gaps = [(b - a, i + 1) for i, (a, b) in enumerate(zip(times, times[1:])) if b > since]
    gap, idx = max(gaps)
    median = statistics.median(b - a for a, b in zip(times, times[1:]))
    return (times[idx] - since) * 1e3, gap * 1e3, median * 1e3, idx


def scenario(c: Cluster, d1: str, d2: str, rng, n: int, prompt_len: int, max_tokens: int, before_switch: int,
             migrate: bool) -> dict:
    """N streams on D1, then D1 -> prefill (drain or migrate) while D2 is the other decode worker."""
    # D2 out of the way while the streams start: a mixed worker is neither picked to prefill nor to
    # decode while prefill and decode workers exist, so its prefix cache never holds their prompts.
    idle = [c.switch(d2, "mixed")]
    streams = [Stream(rng.integers(100, 40000, prompt_len).tolist(), max_tokens) for _ in range(n)]
    threads = [c.start(s) for s in streams]
    wait_for(lambda: all(s.tokens >= before_switch or s.error for s in streams), "the streams to start")
    idle.append(c.switch(d2, "decode"))
    sw = c.switch(d1, "prefill", migrate=migrate)
    for t in threads:
        t.join(600)
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"streams failed: {errors[:2]}")
    idle.append(c.switch(d1, "decode"))
    row = {"mode": "migrate" if migrate else "drain", "streams": n, "tokens": max_tokens, "switch": sw,
           "idle": [s["total_ms"] for s in idle]}
    if migrate:
        handed = sw["ts"]["migrating"]
        seams = [seam(s, handed) for s in streams]
        row["resume_ms"] = [x[0] for x in seams]
        row["gap_ms"] = [x[1] for x in seams]
        row["median_itl_ms"] = statistics.median(x[2] for x in seams)
        row["context"] = [prompt_len + x[3] for x in seams]  # ~ one token per chunk while decoding
    else:
        row["context"] = [prompt_len + before_switch]
    return row


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.0f}"
    return f"{min(xs):.0f}-{max(xs):.0f} (mean {statistics.mean(xs):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4, help="N streams running during the drain/migrate switches")
    ap.add_argument("--stream-prompt-len", type=int, default=240)
    ap.add_argument("--stream-tokens", type=int, default=96, help="max_tokens of each stream (ignore_eos)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048],
                    help="context (prompt + generated) of the single migrated sequence")
    ap.add_argument("--before-switch", type=int, default=16, help="tokens each stream has received at the switch")
    ap.add_argument("--kv-transport", choices=["nixl", "grpc"], default="nixl")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv", choices=["move", "recompute", "both"], default="both",
                    help="migrated sequences take their KV along (migrate_kv), are recomputed, or one run of each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = EngineArgs(dtype=args.dtype, num_kv_blocks=1024, max_model_len=4096)
    modes = ["move", "recompute"] if args.kv == "both" else [args.kv]
    rows = []
    counts: dict[str, dict[str, float]] = {}
    for kv in modes:
        config = ClusterConfig(engine=engine, prefill=1, decode=2, port=0, kv_transport=args.kv_transport,
                               admin_api_keys=(ADMIN,), migrate_kv=kv == "move")
        session = ServeSession(config)
        rng = np.random.default_rng(args.seed)
        try:
            c = Cluster(session.start())
            d1, d2 = sorted(w for w, r in c.ids().items() if r == "decode")
            # Warm-up: one short stream through P and D1 (first-use costs stay out of the figures).
            scenario(c, d1, d2, rng, 1, 32, 8, 2, migrate=False)
            n, plen, tok = args.streams, args.stream_prompt_len, args.stream_tokens
            if kv == modes[0]:
                rows.append(scenario(c, d1, d2, rng, n, plen, tok, args.before_switch, migrate=False))
            found = [scenario(c, d1, d2, rng, n, plen, tok, args.before_switch, migrate=True)]
            for ctx in args.contexts:
                found.append(scenario(c, d1, d2, rng, 1, ctx - args.before_switch, 32, args.before_switch,
                                      migrate=True))
            for r in found:
                r["mode"] = f"migrate ({'KV moved' if kv == 'move' else 'recomputed'})"
            rows += found
            counts[kv] = {k: c.counter(f"pdserve:{k}_total") for k in
                          ("sequences_migrated", "sequences_migrated_in", "migration_recompute", "requests_resumed")}
        finally:
            session.stop()
    idle = [ms for r in rows for ms in r["idle"]]
    print(f"\n1 prefill + 2 decode workers x 1 thread, {args.dtype} default model, KV over {args.kv_transport}; "
          f"streams: random token prompts, greedy, ignore_eos; the switch lands when each has "
          f"{args.before_switch} tokens")
    for kv, cs in counts.items():
        print(f"run '{kv}': " + ", ".join(f"{k} {v:.0f}" for k, v in cs.items()))
    print()
    print("| switch (D1 decode -> prefill) | streams on D1 | context at switch (tokens) | fence -> ready ms "
          "| phases ms | hand-off -> first resumed token ms | seam gap ms (median ITL) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| idle (nothing to drain), {len(idle)} switches | 0 | - | {fmt(idle)} | | | |")
    for r in rows:
        phases = ", ".join(f"{p} {ms:.0f}" for p, ms in r["switch"]["phases"].items())
        resume = fmt(r["resume_ms"]) if "resume_ms" in r else "-"
        gap = f"{fmt(r['gap_ms'])} ({r['median_itl_ms']:.0f})" if "gap_ms" in r else "-"
        what = f"{r['mode']}, {r['streams']} x {r['tokens']}-token stream{'s' if r['streams'] > 1 else ''}"
        print(f"| {what} | {r['streams']} | {fmt(r['context'])} | {r['switch']['total_ms']:.0f} | {phases} | "
              f"{resume} | {gap} |")


if __name__ == "__main__":
    main()
