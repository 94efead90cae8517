"""The encoder budget on a real engine (tiny ERNIE-4.5-VL, float32): with room for one image's
encoder output per step, a prompt with two images is computed in two steps, the encoder never
makes more image tokens in a step than the budget, and the tokens are the same as with room for
both."""
from __future__ import annotations

import numpy as np
import torch

from engine import LLMEngine, SamplingParams
from tests.conftest import VL_TOKENS, assert_no_leaks

IMG, START, END = VL_TOKENS["image_token_id"], VL_TOKENS["image_start_token_id"], VL_TOKENS["image_end_token_id"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _run(checkpoint, budget: int | None) -> tuple[list[int], list[int]]:
    torch.manual_seed(0)
    engine = LLMEngine.from_args(str(checkpoint), dtype="float32", num_kv_blocks=64, max_model_len=512,
                                 max_num_encoder_tokens=budget)
    prompt = [5, START, IMG, END, 6, START, IMG, END, 7]
    engine.add_request("r", prompt, GREEDY, multi_modal_data={"image": [_image(112, 112, 1), _image(56, 112, 2)]})
    per_step, tokens = [], []
    cache = engine.runner.encoder_cache
    while engine.has_unfinished_requests():
        before = cache.encoded_tokens
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
        per_step.append(cache.encoded_tokens - before)
    assert_no_leaks(engine)
    engine.close()
    return tokens, per_step


def test_two_images_over_two_steps_under_a_one_image_budget(tiny_vl_checkpoint):
    want, free = _run(tiny_vl_checkpoint, None)
    assert free[0] == 16 + 8  # 112x112 -> 16 tokens, 56x112 -> 8: both in the first step
    got, limited = _run(tiny_vl_checkpoint, 16)
    assert got == want
    assert limited[:2] == [16, 8] and max(limited) <= 16
