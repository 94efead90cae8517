"""Expert parallelism on this machine: EP=1 vs EP=2 on a small random MoE, and the share of
rank 0's step time spent in the expert all-reduce (communication plus waiting for the other rank).

A random ERNIE-4.5-MoE checkpoint (16 experts, top-2, one shared expert, 4 layers, hidden 512),
bf16, 8 random 64-token prompts, 32 output tokens each (ignore_eos), greedy; one process per rank,
1 thread each; EP=1 also at 2 threads (the same cores as EP=2).

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
from engine.parallel import group as ep_group  # noqa: E402

REDUCE_S = [0.0]


def _timed_all_reduce(original):
    def timed(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        original(self, t)
        REDUCE_S[0] += time.perf_counter() - t0

    return timed


def build_checkpoint(folder: Path) -> Path:
    import transformers as tf

    cfg = tf.Ernie4_5_MoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, moe_intermediate_size=512, moe_num_experts=16, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=0, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    tf.Ernie4_5_MoeForCausalLM(cfg).save_pretrained(folder)
    return folder


def run(path: Path, ep: int, threads: int, prompts, params, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    REDUCE_S[0] = 0.0
    with LLM(str(path), dtype="bfloat16", num_kv_blocks=256, expert_parallel_size=ep) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        times = []
        REDUCE_S[0] = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            times.append(time.perf_counter() - t0)
    tokens = len(prompts) * params.max_tokens
    return tokens / statistics.median(times), REDUCE_S[0] / sum(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ep_group.EPGroup.all_reduce = _timed_all_reduce(ep_group.EPGroup.all_reduce)
    path = build_checkpoint(Path(tempfile.mkdtemp(prefix="ep-bench-")))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (64,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    rows = [("EP=1, 1 thread", 1, 1), ("EP=1, 2 threads", 1, 2), ("EP=2, 1 thread per rank", 2, 1)]
    results = {name: run(path, ep, threads, prompts, params, args.repeats) for name, ep, threads in rows}
    base = results["EP=1, 1 thread"][0]
    print(f"random ERNIE-4.5-MoE (16 experts, top-2, 4 layers, hidden 512), bf16, 8 x (64 in / 32 out), "
          f"median of {args.repeats}")
    print("| setup | out tok/s | vs EP=1 1 thread | all-reduce share of rank 0 time |")
    print("|---|---|---|---|")
    for name, (tps, share) in results.items():
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {share * 100:.0f}% |")


if __name__ == "__main__":
    main()
