"""``pdserve`` command line: serve, router, launch, bench, generate, convert, bench-engine.

Engine imports happen inside the command functions so ``pdserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_generate(args: argparse.Namespace) -> int:
    prompts = args.prompt or ["What is the capital of France?"]
    try:
        llm = _make_llm(args)
    except ValueError as exc:
        print(f"pdserve generate: error: {exc}", file=sys.stderr)
        return 2
    params = _params(args)
    try:
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
    finally:
        llm.close()  # stops the ranks of an expert-parallel group
    for out in outputs:
        print(out.outputs[0].text, flush=True)
    return 0


def _make_llm(args: argparse.Namespace):
    from engine import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        **{k: v for k in ("expert_parallel_size", "num_redundant_experts", "eplb_interval", "ep_dispatch")
           if (v := getattr(args, k)) is not None},
    )


def _params(args: argparse.Namespace):
    from engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,  # 0 or -1 = disabled, as in SamplingParams
        seed=args.seed,
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from engine.loader import convert_gguf

    try:
        folder = convert_gguf(args.gguf, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"pdserve convert: error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from engine.bench import main as bench_main

    return int(bench_main(args.bench_args) or 0)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from pydantic import ValidationError

    from cluster.launch import ServeSession

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _serve_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"pdserve serve: error: {exc}", file=sys.stderr)
        return 2
    session = ServeSession(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = session.start()
        roles = f"{config.mixed} mixed" if config.mixed else f"{config.prefill} prefill + {config.decode} decode"
        eps = sorted({w["expert_parallel_size"] for w in session.workers})
        ep = f", expert-parallel size {'/'.join(map(str, eps))}" if eps != [1] else ""
        planner = ", planner on" if config.planner.enabled else ""
        print(f"pdserve: serving {config.engine.model or 'the default model'} ({roles}{ep}, KV over "
              f"{config.kv_transport}{planner}) at {url}/v1", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("pdserve: stopping", flush=True)
        session.stop()
    return 0


def _serve_config(args: argparse.Namespace):
    import os

    from cluster.config import ClusterConfig, EngineArgs

    engine = {k: getattr(args, k) for k in EngineArgs.model_fields if getattr(args, k, None) is not None}
    if args.no_enable_prefix_caching:
        engine["enable_prefix_caching"] = False
    fields = dict(
        served_model_name=args.served_model_name, prefill=args.prefill, decode=args.decode, mixed=args.mixed,
        host=args.host, port=args.port, redis_url=args.redis_url, kv_transport=args.kv_transport,
        kv_failure_policy=args.kv_failure_policy, rate_limit_per_minute=args.rate_limit_per_minute,
        reasoning_parser=args.reasoning_parser, worker_threads=args.worker_threads, ray_address=args.ray_address,
        cpu_bind=args.cpu_bind, drain_timeout_seconds=args.drain_timeout_seconds,
    )
    media = {k: v for k, v in (("enable_mm", args.enable_mm), ("limit_mm_per_prompt", args.limit_mm_per_prompt),
                               ("allowed_media_domains", args.allowed_media_domains),
                               ("allowed_local_media_path", args.allowed_local_media_path)) if v is not None}
    if media:
        fields["multimodal"] = media
    keys = list(args.api_key or [])
    if not keys and os.environ.get("PDSERVE_API_KEY"):
        keys = [k.strip() for k in os.environ["PDSERVE_API_KEY"].split(",") if k.strip()]
    if keys:
        fields["api_keys"] = tuple(keys)
    admin = list(args.admin_api_key or [])
    if not admin and os.environ.get("PDSERVE_ADMIN_API_KEY"):
        admin = [k.strip() for k in os.environ["PDSERVE_ADMIN_API_KEY"].split(",") if k.strip()]
    if admin:
        fields["admin_api_keys"] = tuple(admin)
    if args.mixed and args.prefill is None and args.decode is None:
        fields["prefill"] = fields["decode"] = 0
    fields = {k: v for k, v in fields.items() if v is not None}
    planner = {k: v for k, v in (("enabled", True if args.planner else None), ("slo_ttft_ms", args.slo_ttft_ms),
                                 ("slo_itl_ms", args.slo_itl_ms)) if v is not None}
    if args.config:
        base = ClusterConfig.from_yaml(args.config)
        data = base.model_dump()
        data["engine"] = {**data["engine"], **engine}
        data["planner"] = {**data["planner"], **planner}
        data["multimodal"] = {**data["multimodal"], **fields.pop("multimodal", {})}
        data.update(fields)
        return ClusterConfig.model_validate(data)
    return ClusterConfig(engine=EngineArgs(**engine), planner=planner, **fields)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file with ClusterConfig fields (flags override it)")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--mixed", type=int, default=None, help="colocated workers instead of prefill/decode")
    p.add_argument("--host", default=None, help="router and worker bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="router port (default 8000)")
    p.add_argument("--redis-url", default=None, help="Redis for cluster state (default: an embedded one)")
    p.add_argument("--kv-transport", choices=["nixl", "grpc"], default=None)
    p.add_argument("--kv-failure-policy", choices=["fail", "recompute"], default=None)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; default: $PDSERVE_API_KEY, comma separated)")
    p.add_argument("--admin-api-key", action="append", default=None,
                   help="key of the /admin API: worker list and role switches (repeatable; default: "
                        "$PDSERVE_ADMIN_API_KEY, comma separated; none = the admin API is off)")
    p.add_argument("--drain-timeout", type=float, default=None, dest="drain_timeout_seconds",
                   help="role switch: seconds a worker waits for its old role's in-flight work (default 60)")
    p.add_argument("--planner", action="store_true",
                   help="switch worker roles as the traffic mix changes (the SLA planner; more settings "
                        "under `planner:` in --config)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="planner: time-to-first-token target (p90)")
    p.add_argument("--slo-itl-ms", type=float, default=None, help="planner: inter-token latency target (p90)")
    p.add_argument("--rate-limit-per-minute", type=int, default=None, help="requests per minute per API key")
    p.add_argument("--reasoning-parser", choices=["think", "qwen3", "deepseek_r1", "ernie-45-vl", "ernie45"],
                   default=None)
    p.add_argument("--enable-mm", action=argparse.BooleanOptionalAction, default=None,
                   help="image input (default: on exactly for a vision model)")
    p.add_argument("--limit-mm-per-prompt", type=_json_object, default=None,
                   help='most items per prompt, e.g. \'{"image": 10}\' (default 10 images; video is not supported)')
    p.add_argument("--mm-processor-kwargs", type=_json_object, default=None,
                   help='image processor options, e.g. \'{"max_pixels": 802816}\'')
    p.add_argument("--allowed-media-domains", default=None,
                   help="comma-separated hosts whose image URLs are fetched (trusted: they may be private); "
                        "default: any host with only public addresses")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files image URLs may name (file://...); default: none")
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads per worker (default 1)")
    p.add_argument("--cpu-bind", default=None,
                   help="pin workers to cores: auto (default: own cores per worker when they fit), none, "
                        "or core sets per worker in start order, e.g. '0|1' or '0-1|2-3'")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--quantization", choices=["wint8", "wint4"], default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    _add_ep_args(p, help_size="MoE models: shard each worker's experts over N ranks (N CPUs per worker); "
                              "per worker: `workers:` in --config")
    p.add_argument("--log-level", default="INFO")


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_ep_args(p: argparse.ArgumentParser, help_size: str) -> None:
    p.add_argument("--expert-parallel-size", type=int, default=None, help=help_size)
    p.add_argument("--num-redundant-experts", type=int, default=None,
                   help="EP: extra expert slots per rank, for replicas of the hottest experts")
    p.add_argument("--eplb-interval", type=int, default=None,
                   help="EP: rebalance expert placement (EPLB) from observed load every N steps (default off)")
    p.add_argument("--ep-dispatch", choices=["replicated", "alltoall"], default=None,
                   help="EP: move only expert results (replicated, default) or also hidden states (alltoall)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench.main import run

    return int(run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``pdserve`` argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="pdserve", description="pdserve: disaggregated prefill/decode LLM serving"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI API with prefill/decode workers on Ray")
    _add_serve_args(serve)
    serve.set_defaults(func=_cmd_serve)

    from cluster.cli_deploy import add_parsers as add_deploy_parsers

    add_deploy_parsers(sub)

    from cluster.bench.main import add_arguments as add_bench_arguments

    bench_serving = sub.add_parser("bench", help="load-test any OpenAI-compatible server")
    add_bench_arguments(bench_serving)
    bench_serving.set_defaults(func=_cmd_bench)

    gen = sub.add_parser("generate", help="offline generation with the engine")
    gen.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2)")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = disabled")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    gen.add_argument("--quantization", choices=["wint8", "wint4"], default=None)
    gen.add_argument("--max-model-len", type=int, default=None)
    _add_ep_args(gen, help_size="shard an MoE model's routed experts over N processes (gloo)")
    gen.set_defaults(func=_cmd_generate)

    conv = sub.add_parser("convert", help="convert a .gguf file into an HF safetensors folder")
    conv.add_argument("--gguf", required=True, help="input .gguf file")
    conv.add_argument("--out", default=None, help="output folder (default: the model cache)")
    conv.set_defaults(func=_cmd_convert)

    bench = sub.add_parser(
        "bench-engine",
        help="offline engine throughput benchmark (arguments go to engine.bench)",
        add_help=False,  # let `pdserve bench-engine --help` reach the benchmark's own parser
    )
    # Its arguments are collected by parse_known_args in main(): argparse.REMAINDER cannot
    # capture a leading option such as `--num-seqs 8`.
    bench.set_defaults(func=_cmd_bench_engine, forwards_unknown=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pdserve`` script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "forwards_unknown", False):
        args.bench_args = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
