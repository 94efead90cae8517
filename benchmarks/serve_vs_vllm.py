"""Serving capacity on this machine: pdserve 1P+1D, pdserve mixed, and vLLM-CPU, one after another.

Each setup is started as its user would start it (`pdserve serve ...`, `vllm serve ...`) on the
same cores, driven by the same client over a sweep of Poisson request rates (random prompts,
`--input-len` in / `--output-len` out, ignore_eos), and stopped before the next starts. The client
is `vllm bench serve` when a vLLM install is given (`--vllm-venv`, see ../shared/ENVIRONMENT.md for
the vllm-cpu recipe), else `pdserve bench`. Per rate it prints goodput, SLO attainment (share of
requests with TTFT <= --slo-ttft and TPOT <= --slo-tpot), TTFT and TPOT percentiles; per setup its
capacity: the highest rate whose attainment is >= --capacity-attainment.

    .venv/bin/python benchmarks/serve_vs_vllm.py --vllm-venv /tmp/vllm-venv --rates 0.5 1 1.5 2 3
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{url}/v1/models", timeout=5)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), then wait."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def server_command(setup: str, port: int, model_dir: str, args) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    pdserve = str(ROOT / ".venv" / "bin" / "pdserve")
    extra = args.pdserve_args.split()
    if setup == "pdserve-1P1D":
        return [pdserve, "serve", "--prefill", "1", "--decode", "1", "--port", str(port), *extra], env
    if setup == "pdserve-mixed":
        return [pdserve, "serve", "--mixed", "1", "--worker-threads", "2", "--port", str(port), *extra], env
    if setup == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="4")
        return [str(Path(args.vllm_venv) / "bin" / "vllm"), "serve", model_dir, "--dtype", "bfloat16", "--enforce-eager",
                "--port", str(port), "--served-model-name", "SmolLM2-135M-Instruct", "--max-model-len", "2048"], env
    raise ValueError(setup)


def attainment(ttfts_s: list[float], tpots_s: list[float], slo_ttft_ms: float, slo_tpot_ms: float) -> float:
    ok = sum(1 for a, b in zip(ttfts_s, tpots_s) if a * 1e3 <= slo_ttft_ms and b * 1e3 <= slo_tpot_ms)
    return ok / max(len(ttfts_s), 1)


def run_client(url: str, model: str, model_dir: str, rate: float, seed: int, out: Path, args) -> dict:
    """One client run at `rate`; returns a summary in one shape whichever client ran."""
    if args.vllm_venv:
        cmd = [str(Path(args.vllm_venv) / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
               "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model_dir, "--dataset-name", "random",
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--request-rate", str(rate), "--seed", str(seed), "--ignore-eos",
               "--goodput", f"ttft:{args.slo_ttft}", f"tpot:{args.slo_tpot}", "--save-result", "--save-detailed",
               "--result-dir", str(out.parent), "--result-filename", out.name, "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metric-percentiles", "50,90,99", "--disable-tqdm"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd="/tmp")
        r = json.loads(out.read_text())
        ok = [i for i, e in enumerate(r.get("errors", [])) if not e] or list(range(len(r["ttfts"])))
        ttfts = [r["ttfts"][i] for i in ok]
        tpots = [statistics.fmean(r["itls"][i]) if r["itls"][i] else 0.0 for i in ok]
        return {"completed": r["completed"], "failed": r.get("failed", args.num_prompts - r["completed"]),
                "goodput": r.get("request_goodput") or 0.0, "req_s": r["request_throughput"],
                "out_tok_s": r["output_throughput"], "ttft_p50": r["median_ttft_ms"], "ttft_p99": r["p99_ttft_ms"],
                "tpot_p50": r["median_tpot_ms"], "tpot_p99": r["p99_tpot_ms"],
                "attainment": attainment(ttfts, tpots, args.slo_ttft, args.slo_tpot) * len(ttfts) / args.num_prompts}
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--base-url", url, "--dataset", "random", "--input-len",
           str(args.input_len), "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--request-rate", str(rate), "--seed", str(seed), "--tokenizer", model_dir, "--disable-tqdm",
           "--result-json", str(out), "--goodput", f"ttft:{args.slo_ttft}", f"tpot:{args.slo_tpot}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    s = json.loads(out.read_text())["summary"]
    return {"completed": s["completed"], "failed": s.get("failed", 0), "goodput": s["goodput"],
            "req_s": s["request_throughput"], "out_tok_s": s["output_throughput"], "ttft_p50": s["ttft_ms"]["median"],
            "ttft_p99": s["ttft_ms"]["p99"], "tpot_p50": s["tpot_ms"]["median"], "tpot_p99": s["tpot_ms"]["p99"],
            "attainment": s["good_requests"] / args.num_prompts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=["pdserve-1P1D", "pdserve-mixed", "vllm"])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--slo-ttft", type=float, default=2000.0, help="ms")
    ap.add_argument("--slo-tpot", type=float, default=60.0, help="ms")
    ap.add_argument("--capacity-attainment", type=float, default=0.9)
    ap.add_argument("--vllm-venv", default=None, help="a venv with vllm-cpu: serves the 'vllm' setup and is the client")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--pdserve-args", default="", help="more `pdserve serve` flags for the pdserve setups, one string")
    args = ap.parse_args()
    if "vllm" in args.setups and not args.vllm_venv:
        print("no --vllm-venv: skipping the vllm setup, pdserve bench is the client", file=sys.stderr)
        args.setups = [s for s in args.setups if s != "vllm"]
    sys.path.insert(0, str(ROOT))
    from engine.loader import resolve_model_path

    model_dir = str(resolve_model_path(None))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[float, dict]] = {}
    for setup in args.setups:
        port = free_port()
        cmd, env = server_command(setup, port, model_dir, args)
        log = open(out_dir / f"{setup}.server.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/tmp")
        try:
            url = f"http://127.0.0.1:{port}"
            model = wait_ready(url, proc)
            run_client(url, model, model_dir, 1.0, 999, out_dir / f"{setup}-warmup.json",
                       argparse.Namespace(**{**vars(args), "num_prompts": 4}))
            results[setup] = {}
            for i, rate in enumerate(args.rates):
                results[setup][rate] = run_client(url, model, model_dir, rate, i, out_dir / f"{setup}-rate{rate}.json", args)
                print(setup, rate, json.dumps(results[setup][rate]), flush=True)
        finally:
            stop(proc)
            log.close()
    client = "vllm bench serve" if args.vllm_venv else "pdserve bench"
    print(f"\n{args.num_prompts} requests per rate, random {args.input_len} in / {args.output_len} out, client: {client}; "
          f"SLO TTFT <= {args.slo_ttft:.0f} ms and TPOT <= {args.slo_tpot:.0f} ms")
    print("| rate req/s | setup | served req/s | goodput req/s | SLO attainment | TTFT p50 / p99 ms | TPOT p50 / p99 ms | out tok/s | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in args.rates:
        for setup in args.setups:
            r = results[setup][rate]
            print(f"| {rate} | {setup} | {r['req_s']:.2f} | {r['goodput']:.2f} | {100 * r['attainment']:.0f}% "
                  f"| {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['tpot_p50']:.1f} / {r['tpot_p99']:.1f} "
                  f"| {r['out_tok_s']:.1f} | {r['failed']} |")
    print(f"\nCapacity (highest swept rate with >= {100 * args.capacity_attainment:.0f}% of requests within the SLO):")
    caps = {}
    for setup in args.setups:
        ok = [rate for rate in args.rates if results[setup][rate]["attainment"] >= args.capacity_attainment]
        caps[setup] = max(ok) if ok else 0.0
        print(f"- {setup}: {caps[setup]} req/s")
    if caps.get("vllm"):
        for setup in args.setups:
            if setup != "vllm":
                print(f"- {setup} / vllm: {caps[setup] / caps['vllm']:.2f}x")
    (out_dir / "serve_vs_vllm.json").write_text(json.dumps({"args": vars(args), "results": results, "capacity": caps},
                                                            indent=2, default=str))


if __name__ == "__main__":
    main()
