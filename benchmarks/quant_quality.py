"""Quality and speed of weight-only quantization (wint8 / wint4) on the default model.

Usage: THREADS=1 python benchmarks/quant_quality.py        (THREADS defaults to 2)

All engines run bf16 activations and live in one process; the unquantized bf16 engine is the
baseline for every comparison. Measures, per method:

(a) greedy agreement: 8 chat prompts, 48 greedy tokens each (ignore_eos); the fraction of
    positions that match the baseline token-for-token up to the first divergence, the mean
    common-prefix length, and how many of the 8 outputs are identical.
(b) teacher-forced quality on a fixed ~300-token English text, scored in one prefill: mean NLL
    per token, perplexity, their difference vs the baseline, mean KL(baseline || method) and
    top-1 agreement with the baseline's argmax.
(c) decode speed: tok/s over pure-decode steps at batch 1 and 8 (16-token random prompts,
    64 output tokens, ignore_eos), median of 3 runs; methods are interleaved run by run, and
    the ratio to the baseline is reported because other processes may share the CPU.
(d) weight memory: bytes of all parameters and buffers (a tied embedding counted once), and of
    the linear layers alone.

A float32 unquantized engine is included in (a) and (b) as a yardstick for how much of the
divergence plain numerics cause (set FP32_REF=0 to skip it).

An extra variant, "wint4 g128", is wint4 with group_size=128 (which the 576-wide layers of this
model reduce to 64) instead of the engine's group 32 (engine.layers.quantize_model.WINT4_GROUP_SIZE),
patched in for its construction (set WINT4_G128=0 to skip it). The default model is converted
from a Q4_1 GGUF (32-weight blocks, w = d*q + m, q in 0..15), so its "bf16" weights already lie on
a 4-bit grid per 32-block that asymmetric int4 with group 32 reproduces almost exactly.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", 2)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.bench import run_pdserve  # noqa: E402
import engine.layers.quantize_model as quantize_model  # noqa: E402
from engine.layers.quant import WeightOnlyLinear  # noqa: E402

BASE = "bf16 (baseline)"
# variant name -> (quantization, wint4 group size or None for the engine's default)
VARIANTS: dict[str, tuple[str | None, int | None]] = {BASE: (None, None), "wint8": ("wint8", None), "wint4": ("wint4", None)}
if os.environ.get("WINT4_G128", "1") != "0":
    VARIANTS["wint4 g128"] = ("wint4", 128)
GEN_TOKENS = 48
SPEED_TOKENS = 64
SPEED_BATCHES = (1, 8)
SPEED_REPS = 3

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning a new programming language.",
    "What is the difference between a virus and a bacterium?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How many legs does a spider have, and why?",
]

TEXT = """\
Paris has been one of the great cities of Europe for more than a thousand years. In the third \
century BC a Celtic people known as the Parisii settled on an island in the river Seine, and \
after the Roman conquest of Gaul the town of Lutetia grew up on the left bank, with a forum, \
baths and an amphitheatre. By the end of the Roman period the settlement had taken the name \
of its founders, and in the early sixth century Clovis, king of the Franks, made it his \
capital. During the Middle Ages Paris became the largest city in the Christian West. The \
cathedral of Notre-Dame was begun in 1163, the university grew into a famous centre of \
learning, and King Philip Augustus surrounded the city with a new wall and built the first \
fortress of the Louvre. The Hundred Years' War, the plague and civil conflict brought long \
periods of hardship, but the city recovered each time. In the seventeenth century Louis XIV \
moved the royal court to Versailles, yet Paris remained the heart of French commerce, art and \
thought. The storming of the Bastille on 14 July 1789 opened the French Revolution, and the \
city was the stage for many of its most dramatic events. In the middle of the nineteenth \
century, under Napoleon III, the prefect Baron Haussmann tore down crowded medieval streets \
and replaced them with wide boulevards, parks, sewers and uniform stone buildings, giving the \
city much of the appearance it has today. The Eiffel Tower, built for the World's Fair of \
1889, was at first criticised by many artists, but it soon became the symbol of the city. \
Today Paris is known around the world for its museums, its cafes, its fashion houses and its \
long tradition of painters, writers and scientists."""


# --------------------------------------------------------------------------- helpers


def build(quantization: str | None, group_size: int | None) -> LLM:
    if group_size is None:
        return LLM(max_model_len=2048, quantization=quantization)
    orig = quantize_model.WINT4_GROUP_SIZE
    quantize_model.WINT4_GROUP_SIZE = group_size
    try:
        return LLM(max_model_len=2048, quantization=quantization)
    finally:
        quantize_model.WINT4_GROUP_SIZE = orig


def weight_bytes(llm: LLM) -> tuple[int, int]:
    """(all parameters + buffers, a tied tensor once; linear layers only)."""
    model = llm.engine.runner.model
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(t.data_ptr(), t)
    total = sum(t.numel() * t.element_size() for t in seen.values())
    linear = 0
    for name, m in model.named_modules():
        if name == "lm_head":
            continue
        if isinstance(m, (torch.nn.Linear, WeightOnlyLinear)):
            linear += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total, linear


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decode_tok_s(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    """Tokens per second over the steps in which every request of the batch is decoding."""
    _, steps = run_pdserve(llm, prompts, out_len)
    return len(prompts) * len(steps) / sum(steps)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    t_start = time.perf_counter()
    llms: dict[str, LLM] = {}
    load_s: dict[str, float] = {}
    for name, (quant, group) in VARIANTS.items():
        t0 = time.perf_counter()
        llms[name] = build(quant, group)
        load_s[name] = time.perf_counter() - t0
    base = llms[BASE]
    tok = base.tokenizer
    refs: dict[str, LLM] = {}
    if os.environ.get("FP32_REF", "1") != "0":
        refs["fp32 (unquantized)"] = LLM(max_model_len=2048, dtype="float32")
    quality_rows: dict[str, LLM] = llms | refs

    # (a) greedy agreement
    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    gen = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
    outs = {name: [list(o.outputs[0].token_ids) for o in llm.chat(convs, gen)] for name, llm in quality_rows.items()}
    base_out = outs[BASE]
    rows_a = []
    for name, o in outs.items():
        prefixes = [common_prefix(a, b) for a, b in zip(o, base_out)]
        rows_a.append([name, f"{sum(prefixes) / (GEN_TOKENS * len(o)):.3f}", f"{statistics.mean(prefixes):.1f}",
                       f"{sum(p == GEN_TOKENS for p in prefixes)}/{len(o)}", " ".join(map(str, prefixes))])

    # (b) teacher-forced NLL on TEXT
    ids = list(tok(TEXT, add_special_tokens=False).input_ids)
    targets = torch.tensor(ids[1:])
    logp = {name: torch.log_softmax(llm.engine.score(ids)[:-1], dim=-1) for name, llm in quality_rows.items()}
    base_lp = logp[BASE]
    base_nll = F.nll_loss(base_lp, targets).item()
    rows_b = []
    for name, lp in logp.items():
        nll = F.nll_loss(lp, targets).item()
        kl = F.kl_div(lp, base_lp, log_target=True, reduction="batchmean").item()
        top1 = (lp.argmax(-1) == base_lp.argmax(-1)).float().mean().item()
        rows_b.append([name, f"{nll:.4f}", f"{torch.exp(torch.tensor(nll)).item():.2f}", f"{nll - base_nll:+.4f}",
                       f"{kl:.4f}", f"{top1:.3f}"])
    del logp, base_lp
    for llm in refs.values():
        del llm
    refs.clear()

    # (c) decode speed, methods interleaved run by run
    gen_ = torch.Generator().manual_seed(0)
    vocab = base.engine.config.model.vocab_size
    speeds: dict[tuple[str, int], list[float]] = {}
    for b in SPEED_BATCHES:
        prompts = torch.randint(0, vocab, (b, 16), generator=gen_).tolist()
        for m in llms:  # warm-up (one-time kernel / allocator setup)
            decode_tok_s(llms[m], prompts, 8)
        for _ in range(SPEED_REPS):
            for m in llms:
                speeds.setdefault((m, b), []).append(decode_tok_s(llms[m], prompts, SPEED_TOKENS))
    med = {k: statistics.median(v) for k, v in speeds.items()}

    # (d) memory
    mem = {m: weight_bytes(llms[m]) for m in llms}

    rows_cd = []
    for m in llms:
        total, linear = mem[m]
        cells = [m]
        for b in SPEED_BATCHES:
            cells += [f"{med[(m, b)]:.1f}", f"{med[(m, b)] / med[(BASE, b)]:.2f}x"]
        cells += [f"{total / 2**20:.1f}", f"{linear / 2**20:.1f}", f"{total / mem[BASE][0]:.2f}", f"{load_s[m]:.1f}"]
        rows_cd.append(cells)

    model = base.engine.config.model
    print(f"# Weight-only quantization on {Path(model.path).name} (bf16 activations), "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print(f"## (a) Greedy agreement with the bf16 baseline ({len(CHAT_PROMPTS)} chat prompts x {GEN_TOKENS} tokens)\n")
    print(table(["method", "matched fraction (to 1st divergence)", "mean common prefix", "identical", "prefix per prompt"],
                rows_a))
    print(f"\n## (b) Teacher-forced NLL on a {len(ids)}-token text ({len(ids) - 1} predictions)\n")
    print(table(["method", "mean NLL", "perplexity", "dNLL vs bf16", "KL(bf16 || method)", "top-1 = bf16"], rows_b))
    print(f"\n## (c, d) Decode speed (tok/s, median of {SPEED_REPS}, {SPEED_TOKENS} tokens, 16-token prompts) "
          "and weight memory\n")
    header = ["method"]
    for b in SPEED_BATCHES:
        header += [f"decode tok/s b={b}", "vs bf16"]
    header += ["weights MiB", "linear layers MiB", "vs bf16", "load s"]
    print(table(header, rows_cd))
    print("\nruns (tok/s): " + "; ".join(f"{m} b={b}: " + ", ".join(f"{x:.1f}" for x in v)
                                         for (m, b), v in speeds.items()))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
