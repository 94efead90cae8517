"""Expert parallelism on this machine: EP=1 vs EP=2 on a small random MoE, the share of rank 0's
time spent in the EP collectives (all-to-all dispatch/combine and the all-gathers: communication
plus waiting for the other rank), and the effect of rebalancing (EPLB) on a skewed routing.

A random ERNIE-4.5-MoE checkpoint (16 experts, top-2, one shared expert, 4 layers, hidden 512),
bf16, 8 random 64-token prompts, 32 output tokens each (ignore_eos; --input-len/--output-len),
greedy, throughput counted over prompt + output tokens; one process per rank,
1 thread each; EP=1 also at 2 threads (the same cores as EP=2). The skewed checkpoint is the
same model with a routing correction bias that sends most tokens to experts 0-3, all of which
the contiguous placement puts on rank 0; "rebalanced" runs one pass, rebalances from its counts
(with 2 spare slots per rank for replicas, or none), then measures. EP=2 rows use the default
"replicated" dispatch (only expert results travel) unless they say "all-to-all dispatch" (hidden
states travel too).

    .venv/bin/python benchmarks/ep_throughput.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.parallel.placement import ExpertPlacement, imbalance  # noqa: E402

HOT_BIAS = 0.04  # added to experts 0-3's routing scores in the skewed checkpoint


def build_checkpoint(folder: Path, skewed: bool = False, expert_size: int = 512) -> Path:
    import transformers as tf

    cfg = tf.Ernie4_5_MoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, moe_intermediate_size=expert_size, moe_num_experts=16, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=0, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = tf.Ernie4_5_MoeForCausalLM(cfg)
    if skewed:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                with torch.no_grad():
                    t.zero_()
                    t.view(-1)[:4] = HOT_BIAS
    model.save_pretrained(folder)
    return folder


def run(path: Path, ep: int, threads: int, prompts, params, repeats: int, redundant: int = -1,
        dispatch: str = "replicated") -> dict:
    """`redundant` >= 0: rebalance after a first pass, with that many spare slots per rank."""
    torch.set_num_threads(threads)
    kw = {} if ep == 1 else {"expert_parallel_size": ep, "num_redundant_experts": max(redundant, 0),
                             "ep_dispatch": dispatch}
    with LLM(str(path), dtype="bfloat16", num_kv_blocks=256, **kw) as llm:
        runner = llm.engine.runner
        llm.generate(prompts if redundant >= 0 else prompts[:2], params)  # warm-up (and the counts to balance on)
        if ep > 1:
            if redundant >= 0:
                runner.rebalance()
            comm = runner.group.comm
            comm.seconds = 0.0
        totals0 = [c.clone() for c in runner.expert_counts(total=True)]
        pairs0 = runner.rank_pairs() if ep > 1 else {}
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            times.append(time.perf_counter() - t0)
        counts = [(c - c0).tolist() for c, c0 in zip(runner.expert_counts(total=True), totals0)]
        hot = sum(sum(c[:4]) for c in counts) / max(1, sum(sum(c) for c in counts))
        # Tokens processed (prompt + output) per second: the same work in every row.
        work = sum(len(p) for p in prompts) + len(prompts) * params.max_tokens
        result = {"tps": work / statistics.median(times), "hot": hot}
        if ep > 1:
            result["comm"] = comm.seconds / sum(times)
            # Measured: (token, expert) pairs each rank computed, max / mean, averaged over layers.
            pairs = runner.rank_pairs()
            result["measured"] = statistics.mean(
                imbalance([b - a for a, b in zip(pairs0[i], pairs[i])]) for i in pairs)
            # Expected max/mean rank load over the MoE layers for the counts just measured.
            result["imbalance"] = statistics.mean(imbalance(p.rank_loads(c)) for p, c in zip(runner.placements.values(), counts))
            contiguous = ExpertPlacement.contiguous(16, ep)
            result["contiguous_imbalance"] = statistics.mean(imbalance(contiguous.rank_loads(c)) for c in counts)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--expert-size", type=int, default=512, help="moe_intermediate_size (larger: experts dominate)")
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ep-bench-"))
    uniform = build_checkpoint(tmp / "uniform", expert_size=args.expert_size)
    skewed = build_checkpoint(tmp / "skewed", skewed=True, expert_size=args.expert_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (args.input_len,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    rows = [
        ("uniform", "EP=1, 1 thread", uniform, 1, 1, -1),
        ("uniform", "EP=1, 2 threads", uniform, 1, 2, -1),
        ("uniform", "EP=2, 1 thread per rank", uniform, 2, 1, -1),
        ("uniform", "EP=2, hidden-state all-to-all dispatch", uniform, 2, 1, -1, "alltoall"),
        ("skewed", "EP=1, 1 thread", skewed, 1, 1, -1),
        ("skewed", "EP=2 contiguous", skewed, 2, 1, -1),
        ("skewed", "EP=2 rebalanced, no replicas", skewed, 2, 1, 0),
        ("skewed", "EP=2 rebalanced, 2 replica slots/rank", skewed, 2, 1, 2),
    ]
    results = {(routing, name): run(path, ep, threads, prompts, params, args.repeats, *rest)
               for routing, name, path, ep, threads, *rest in rows}
    print(f"random ERNIE-4.5-MoE (16 experts of size {args.expert_size}, top-2, 4 layers, hidden 512), bf16, "
          f"8 x ({args.input_len} in / {args.output_len} out), "
          f"median of {args.repeats}")
    print("| routing | setup | tok/s (in + out) | vs EP=1 1 thread | EP collectives share of rank 0 time "
          "| expert pairs per rank, max/mean | tokens to experts 0-3 |")
    print("|---|---|---|---|---|---|---|")
    for (routing, name), r in results.items():
        base = results[(routing, "EP=1, 1 thread")]["tps"]
        comm = f"{r['comm'] * 100:.0f}%" if "comm" in r else "-"
        imb = (f"{r['measured']:.2f} (model {r['imbalance']:.2f}; contiguous {r['contiguous_imbalance']:.2f})"
               if "imbalance" in r else "-")
        print(f"| {routing} | {name} | {r['tps']:.1f} | {r['tps'] / base:.2f}x | {comm} | {imb} | {r['hot'] * 100:.0f}% |")


if __name__ == "__main__":
    main()
