"""``pdserve bench``: arguments and the run. Heavy imports wait until run() so --help stays fast.

Exit status: 0 when at least one request succeeded, 1 when none did or the setup failed (bad
dataset, no model listed), 2 for invalid arguments, 130 when interrupted with Ctrl-C (partial
results are still reported and written).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy at runtime (numpy); only needed for the annotations
    from cluster.bench.workload import BenchRequest

logger = logging.getLogger(__name__)

DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``pdserve bench`` flags to `parser` (a subparser, or a parser of its own)."""
    srv = parser.add_argument_group("server")
    srv.add_argument("--base-url", required=True, help="server root, e.g. http://localhost:8000")
    srv.add_argument("--endpoint", default="/v1/completions",
                     help="/v1/completions (default) or /v1/chat/completions")
    srv.add_argument("--model", default=None, help="model name (default: the first id of GET /v1/models)")
    srv.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    srv.add_argument("--request-timeout", type=float, default=3600.0,
                     help="seconds one request may take in all; 0 = no limit (default: 3600)")

    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default: 1000)")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second; inf sends all at once (default: inf)")
    load.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson",
                      help="poisson arrivals or fixed 1/rate intervals (default: poisson)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="at most this many requests in flight (combines with --request-rate)")
    load.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default: 0)")

    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    data.add_argument("--dataset-path", default=None,
                      help='JSONL file for --dataset jsonl: {"prompt": ..., "output_len": optional}')
    data.add_argument("--input-len", type=int, default=None,
                      help=f"random prompt length in tokens (default: {DEFAULT_INPUT_LEN})")
    data.add_argument("--output-len", type=int, default=None,
                      help=f"output tokens (random default: {DEFAULT_OUTPUT_LEN}; jsonl: lines "
                           "without output_len, else the server decides)")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="random lengths are uniform in len*(1-r)..len*(1+r) (default: 0)")
    data.add_argument("--tokenizer", default=None,
                      help="HF tokenizer (folder or id) for random token prompts and prompt "
                           "lengths; without it random prompts are random words")
    data.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                      help="send ignore_eos and min_tokens so outputs have exactly output-len "
                           "tokens (default: on for random, off for jsonl)")
    data.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    data.add_argument("--extra-body", default=None, help="JSON object merged into every request body")

    out = parser.add_argument_group("output")
    out.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                     help="SLOs in ms, e.g. ttft:500 tpot:50 e2e:3000; a request is good when it "
                          "meets all of them")
    out.add_argument("--result-json", default=None, help="write config, summary and requests here")
    out.add_argument("--plot", default=None, help="write a PNG of the latency distributions here")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _fail(message: str, status: int) -> int:
    print(f"pdserve bench: error: {message}", file=sys.stderr)
    return status


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validates what argparse cannot; returns the parsed --extra-body."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0 (or inf)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.request_timeout < 0:
        raise ValueError("--request-timeout must be >= 0")
    for flag in ("input_len", "output_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.dataset == "jsonl" and not args.dataset_path:
        raise ValueError("--dataset jsonl needs --dataset-path")
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--extra-body is not valid JSON: {exc.msg}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    return extra


def _config_for_json(args: argparse.Namespace, model: str, url: str) -> dict[str, Any]:
    """The run's settings, without the API key and without non-JSON values (such as func)."""
    skip = {"api_key", "func"}
    config = {k: v for k, v in vars(args).items()
              if k not in skip and isinstance(v, (str, int, float, bool, list, type(None)))}
    config.update(model=model, url=url, api_key_set=bool(args.api_key or os.environ.get("OPENAI_API_KEY")))
    return config


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (from a parser given add_arguments)."""
    import asyncio

    from cluster.bench import workload
    from cluster.bench.metrics import parse_slos

    try:
        extra_body = _check_args(args)
        slos = parse_slos(args.goodput)
    except ValueError as exc:
        return _fail(str(exc), 2)
    try:
        tokenizer = workload.load_tokenizer(args.tokenizer) if args.tokenizer else None
        if args.dataset == "random":
            requests = workload.random_requests(
                args.num_prompts, args.input_len or DEFAULT_INPUT_LEN, args.output_len or DEFAULT_OUTPUT_LEN,
                seed=args.seed, range_ratio=args.random_range_ratio, tokenizer=tokenizer,
            )
        else:
            requests = workload.load_jsonl(
                args.dataset_path, default_output_len=args.output_len, num=args.num_prompts, tokenizer=tokenizer
            )
        offsets = workload.arrival_offsets(len(requests), args.request_rate, args.arrival, args.seed)
    except (OSError, ValueError) as exc:
        return _fail(str(exc), 1)
    try:
        return asyncio.run(_amain(args, requests, offsets, slos, extra_body))
    except KeyboardInterrupt:
        # Reached on a second Ctrl-C, or one before the requests started.
        print("pdserve bench: interrupted", file=sys.stderr)
        return 130


class _SetupError(Exception):
    pass


async def _amain(args: argparse.Namespace, requests: list[BenchRequest], offsets: list[float],
                 slos: dict[str, float], extra_body: dict[str, Any]) -> int:
    import asyncio

    import httpx
    from tqdm import tqdm

    from cluster.bench import report
    from cluster.bench.client import EndpointConfig, StreamingClient, first_model, is_chat_endpoint, join_url
    from cluster.bench.metrics import summarize
    from cluster.bench.runner import run_schedule

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    timeout = args.request_timeout or None
    url = join_url(args.base_url, args.endpoint)
    # No pool limit: a capped pool would queue requests inside httpx, after their clock started.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as http:
        try:
            model = args.model or await first_model(http, args.base_url, api_key)
        except Exception as exc:  # noqa: BLE001 - any failure here means no server to measure
            return _fail(f"cannot list models at {args.base_url} ({type(exc).__name__}: {exc}); pass --model", 1)
        ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.dataset == "random"
        cfg = EndpointConfig(url=url, model=model, chat=is_chat_endpoint(args.endpoint), api_key=api_key,
                             ignore_eos=ignore_eos, temperature=args.temperature, extra_body=extra_body,
                             timeout_s=timeout)
        client = StreamingClient(cfg, http)
        logger.info("benchmarking %s (model %s): %d requests", url, model, len(requests))
        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="pdserve bench", unit="req")
        failures = 0

        def on_done(record: Any) -> None:
            nonlocal failures
            bar.update(1)
            if not record.success:
                failures += 1
                bar.set_postfix(failed=failures, refresh=False)

        remove_handler = _stop_on_sigint(asyncio.current_task())
        try:
            result = await run_schedule(requests, offsets, client.send,
                                        max_concurrency=args.max_concurrency, on_done=on_done)
        finally:
            remove_handler()
            bar.close()

    summary = summarize(result.records, result.duration_s, slos)
    print(report.format_table(summary, max_concurrency=args.max_concurrency,
                              request_rate=args.request_rate, interrupted=result.interrupted))
    if args.result_json:
        report.write_json(args.result_json, _config_for_json(args, model, url), summary, result.records,
                          interrupted=result.interrupted)
        print(f"result JSON: {args.result_json}")
    if args.plot:
        title = (f"{model} | {args.endpoint} | rate {args.request_rate:g} req/s | "
                 f"max concurrency {args.max_concurrency or 'unlimited'}")
        report.write_plot(args.plot, result.records, title=title)
        print(f"plot: {args.plot}")
    if result.interrupted:
        return 130
    return 0 if summary.completed > 0 else 1


def _stop_on_sigint(task: Any) -> Any:
    """First Ctrl-C cancels `task` (the run stops and reports); a second one raises as usual.

    Returns a function that removes the handler. Outside the main thread (or on platforms
    without loop signal handlers) nothing is installed.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    installed = True

    def remove() -> None:
        nonlocal installed
        if installed:
            installed = False
            loop.remove_signal_handler(signal.SIGINT)  # back to the default KeyboardInterrupt

    def on_sigint() -> None:
        print("\npdserve bench: stopping (Ctrl-C again to quit at once)", file=sys.stderr)
        remove()
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError, ValueError):
        installed = False
    return remove


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m cluster.bench.main``); pdserve's CLI calls add_arguments/run."""
    parser = argparse.ArgumentParser(prog="pdserve bench", description="Benchmark an OpenAI-compatible server with streamed requests.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
