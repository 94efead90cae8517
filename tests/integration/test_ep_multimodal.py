"""Expert parallelism on the tiny ERNIE-4.5-VL (modality-isolated MoE: 4 text + 4 vision experts
of different widths, top-2, one shared expert; float32): an EP=2 group places the 2E experts as
one set and gives EP=1's greedy tokens for image and text requests in one batch, with either
dispatch, tiny chunks inside images, replicas, and after a rebalance; both modalities' experts
are counted."""
from __future__ import annotations

import numpy as np
import pytest

from engine import LLMEngine, SamplingParams
from engine.parallel import ExpertPlacement
from tests.cluster_harness import pid_alive
from tests.conftest import VL_TOKENS

IMG, START, END = VL_TOKENS["image_token_id"], VL_TOKENS["image_start_token_id"], VL_TOKENS["image_end_token_id"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
KW = dict(dtype="float32", num_kv_blocks=128, max_model_len=512)


def _image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


REQUESTS = [
    ([5, START, IMG, END, 6, 7], [_image(112, 168, 1)]),
    ([START, IMG, END, 9, START, IMG, END, 10], [_image(56, 112, 2), _image(84, 84, 3)]),
    ([11, 12, 13, 14], []),
]


def _run(engine: LLMEngine, prefix: str = "r") -> list[list[int]]:
    for i, (prompt, images) in enumerate(REQUESTS):
        engine.add_request(f"{prefix}{i}", prompt, GREEDY, multi_modal_data={"image": images} if images else None)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return [out[f"{prefix}{i}"] for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def single(tiny_vl_checkpoint):
    engine = LLMEngine.from_args(str(tiny_vl_checkpoint), **KW)
    try:
        return _run(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("extra", [{}, dict(ep_dispatch="alltoall", max_num_batched_tokens=7, block_size=4,
                                            enable_prefix_caching=False, num_redundant_experts=1)],
                         ids=["replicated", "alltoall-small-chunks-replicas"])
def test_ep2_vl_matches_ep1(tiny_vl_checkpoint, single, extra):
    engine = LLMEngine.from_args(str(tiny_vl_checkpoint), expert_parallel_size=2, **KW, **extra)
    pids = engine.runner.group.pids
    try:
        layer = next(m for m in engine.runner.model.layers if hasattr(m.mlp, "vision_gate")).mlp
        # 2E = 8 experts over 2 ranks (+1 replica slot), stored at the wider (text) width.
        assert layer.experts.num_experts == 8
        assert layer.experts.gate_up.shape[0] == 4 + extra.get("num_redundant_experts", 0)
        assert layer.experts.intermediate_size == 32
        assert _run(engine) == single
        counts = engine.runner.expert_counts(total=True)[0]
        assert int(counts[:4].sum()) > 0 and int(counts[4:].sum()) > 0  # text and vision experts both ran
        placements = {i: ExpertPlacement(8, 2, ((1, 3, 5, 6, 7), (0, 1, 2, 4, 6))) for i in engine.runner.placements} \
            if extra else {i: ExpertPlacement(8, 2, ((4, 5, 6, 7), (0, 1, 2, 3))) for i in engine.runner.placements}
        engine.runner.rebalance(placements)
        assert _run(engine, prefix="moved") == single
        assert not engine.leaks()
    finally:
        engine.close()
    assert not any(pid_alive(p) for p in pids)
