"""``pdserve`` command line: generate, convert, bench-engine.

Engine imports happen inside the command functions so ``pdserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    prompts = args.prompt or ["What is the capital of France?"]
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,  # 0 or -1 = disabled, as in SamplingParams
        seed=args.seed,
    )
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for out in outputs:
        print(out.outputs[0].text, flush=True)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """Build the ``pdserve`` argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="pdserve", description="pdserve: disaggregated prefill/decode LLM serving"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
