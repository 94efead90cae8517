"""Image requests through the offline engine: requests per second and time to first token for one
448x448 image + a short question, the vision encoder's share of the prefill, and what the encoder
cache and the prefix cache save on a repeated image.

The model is the tiny random ERNIE-4.5-VL of the tests (no real VLM is available offline here),
so the numbers measure the engine's image path, not a real model's quality or full-size speed.

    .venv/bin/python benchmarks/multimodal.py [--dtype bfloat16] [--requests 8] [--size 448]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLMEngine, SamplingParams  # noqa: E402
from tests.conftest import VL_TOKENS, build_tiny_vl_checkpoint  # noqa: E402

IMG, START, END = VL_TOKENS["image_token_id"], VL_TOKENS["image_start_token_id"], VL_TOKENS["image_end_token_id"]


def image(size: int, seed: int):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def first_token_latency(engine: LLMEngine, rid: str, prompt: list[int], img, max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one request run alone."""
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                       multi_modal_data={"image": [img]})
    ttft = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_vl_checkpoint(Path(tmp) / "vl")
        prompt = [5, 6, START, IMG, END, 7, 8, 9, 10]
        kw = dict(dtype=args.dtype, num_kv_blocks=1024, max_model_len=1024, max_num_batched_tokens=2048)
        engine = LLMEngine.from_args(str(path), **kw)
        first_token_latency(engine, "warm", prompt, image(args.size, 999), 2)  # builds the processor, warms kernels
        model = engine.runner.model

        # Encoder alone vs the whole prefill of the same request (distinct images: no cache hits).
        enc, ttfts, totals = [], [], []
        for i in range(args.requests):
            img = image(args.size, i)
            p = engine._image_processor(img)
            t0 = time.perf_counter()
            model.encode_images([p.pixel_values], [p.grid_thw])
            enc.append(time.perf_counter() - t0)
            ttft, total = first_token_latency(engine, f"a{i}", prompt, img, args.max_tokens)
            ttfts.append(ttft)
            totals.append(total)
        n_img = model.num_image_tokens(engine._image_processor(image(args.size, 0)).grid_thw)
        print(f"tiny ERNIE-4.5-VL, {args.dtype}, one {args.size}x{args.size} image ({n_img} tokens) + "
              f"{len(prompt) - 1} text tokens, {args.max_tokens} output tokens, {torch.get_num_threads()} threads")
        print(f"  TTFT median {statistics.median(ttfts) * 1e3:.1f} ms; encoder alone {statistics.median(enc) * 1e3:.1f} ms "
              f"({statistics.median(enc) / statistics.median(ttfts):.0%} of TTFT, which includes preprocessing)")
        print(f"  one request at a time: {1 / statistics.median(totals):.1f} requests/s")

        # A batch of distinct images, all queued at once.
        t0 = time.perf_counter()
        for i in range(args.requests):
            engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
                               multi_modal_data={"image": [image(args.size, 100 + i)]})
        while engine.has_unfinished_requests():
            engine.step()
        print(f"  {args.requests} queued together: {args.requests / (time.perf_counter() - t0):.1f} requests/s")

        # The same image again: with the prefix cache (KV reused) and with only the encoder cache.
        same = image(args.size, 0)
        hit, _ = first_token_latency(engine, "c0", [5, 6, START, IMG, END, 11, 12, 13], same, 2)
        engine_nopc = LLMEngine.from_args(str(path), enable_prefix_caching=False, **kw)
        first_token_latency(engine_nopc, "warm", prompt, same, 2)  # encodes `same` once
        cached_enc, _ = first_token_latency(engine_nopc, "d0", prompt, same, 2)
        engine_nopc.runner.encoder_cache.max_bytes = 0
        engine_nopc.runner.encoder_cache.clear()
        no_cache, _ = first_token_latency(engine_nopc, "d1", prompt, same, 2)
        print(f"  repeated image: TTFT {no_cache * 1e3:.1f} ms with no cache, {cached_enc * 1e3:.1f} ms with the "
              f"encoder cache only, {hit * 1e3:.1f} ms with the prefix cache (another question)")


if __name__ == "__main__":
    main()
