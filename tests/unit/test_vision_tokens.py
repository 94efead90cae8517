"""The router's image token count (pdcommon/vision.py, plain Python) against the grid the engine's
image processor (transformers') really makes: they must agree for every size and option, or the
router's prompt (one run of placeholders per image, as long as the image's tokens) would not be
the prompt the prefill worker computes."""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from engine.multimodal.processor import ImageProcessor
from pdcommon.vision import ImageGeometry, VisionInfo, geometry_options

ARCH = "Ernie4_5_VLMoeForConditionalGeneration"
QWEN_ARCH = "Qwen2_5_VLForConditionalGeneration"
# architecture -> (its tiny checkpoint's fixture, the checkpoint's image token id)
MODELS = {ARCH: ("tiny_vl_checkpoint", 290), QWEN_ARCH: ("tiny_qwen_vl_checkpoint", 290)}
SIZES = [(1, 1), (13, 7), (28, 28), (56, 56), (100, 30), (30, 100), (448, 448), (640, 480), (1000, 7),
         (7, 1000), (1999, 1001), (1200, 1600)]


def _sizes(seed: int = 0, n: int = 12) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return SIZES + [(rng.randint(1, 900), rng.randint(1, 900)) for _ in range(n)]


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("kwargs", [{}, {"max_pixels": 200 * 200}, {"min_pixels": 300 * 300, "max_pixels": 400 * 400},
                                    {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}}])
def test_router_grid_equals_the_processors(arch, kwargs, request):
    fixture, token = MODELS[arch]
    folder = request.getfixturevalue(fixture)
    proc = ImageProcessor(str(folder), arch, kwargs)
    info = VisionInfo.from_folder(folder, kwargs)
    assert info is not None and info.architecture == arch and info.image_token_id == token
    for w, h in _sizes():
        if max(w, h) / min(w, h) > 200:
            continue
        want = proc(Image.new("RGB", (w, h), (w % 256, h % 256, 7))).grid_thw
        assert info.geometry.grid(w, h) == want, (w, h, kwargs)
        assert info.geometry.num_tokens(w, h) == want[0] * (want[1] // 2) * (want[2] // 2)


def test_extreme_aspect_ratio_is_refused_by_both(tiny_vl_checkpoint):
    proc = ImageProcessor(str(tiny_vl_checkpoint), ARCH)
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageGeometry().grid(2010, 10)
    with pytest.raises(ValueError, match="cannot be processed"):
        proc(Image.new("RGB", (2010, 10)))


def test_preprocessor_config_and_options(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [ARCH], "image_token_id": 7}))
    assert VisionInfo.from_folder(tmp_path).geometry == ImageGeometry()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1000, "longest_edge": 50000}, "patch_size": 16}))
    info = VisionInfo.from_folder(tmp_path, {"max_pixels": 40000})
    assert info.geometry == ImageGeometry(patch_size=16, merge_size=2, min_pixels=1000, max_pixels=40000)
    assert info.image_token_id == 7 and info.processor_kwargs == {"max_pixels": 40000}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert VisionInfo.from_folder(tmp_path) is None
    for bad in ({"max_pixels": 0}, {"min_pixels": "big"}, {"size": 5}, {"merge_size": True}):
        with pytest.raises(ValueError, match="mm_processor_kwargs"):
            geometry_options(bad)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ImageGeometry(min_pixels=10, max_pixels=5)


def test_qwen_defaults_and_preprocessor_config(tmp_path):
    import transformers as tf

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [QWEN_ARCH]}))
    info = VisionInfo.from_folder(tmp_path)
    # The default token id, and the Qwen2-VL processor's own defaults (max 1280 tokens' worth of pixels).
    proc = tf.Qwen2VLImageProcessorPil()
    assert info.image_token_id == 151655
    assert info.geometry == ImageGeometry(patch_size=proc.patch_size, merge_size=proc.merge_size,
                                          min_pixels=proc.size["shortest_edge"], max_pixels=proc.size["longest_edge"],
                                          temporal_patch_size=proc.temporal_patch_size)
    # The Hub's preprocessor_config.json spelling: min/max_pixels at the top, next to `size`.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 3136, "longest_edge": 12845056},
         "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}))
    geo = VisionInfo.from_folder(tmp_path).geometry
    assert (geo.min_pixels, geo.max_pixels, geo.temporal_patch_size) == (3136, 12845056, 2)
    # Two frames per patch widen the pixel rows, not the grid: the count is that of one frame.
    assert geo.grid(1000, 700) == ImageGeometry(min_pixels=3136, max_pixels=12845056).grid(1000, 700)
    with pytest.raises(ValueError, match="temporal_patch_size"):
        geometry_options({"temporal_patch_size": 0})
