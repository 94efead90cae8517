"""Qwen2.5-VL with images: greedy tokens, vision features (windowed ViT + patch merger) and 3D
rotary positions against transformers' own model and image processor (float32), chunked prefill
through an image, the prefix and encoder caches keyed by image content, and weight loading."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.conftest import QWEN_VL_TOKENS, drain_request, random_image, run_mm_requests

IMG = QWEN_VL_TOKENS["image_token_id"]
START, END = QWEN_VL_TOKENS["vision_start_token_id"], QWEN_VL_TOKENS["vision_end_token_id"]
ARCH = "Qwen2_5_VLForConditionalGeneration"
N_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)
image = random_image


@pytest.fixture(scope="module")
def reference(tiny_qwen_vl_checkpoint):
    import transformers as tf

    model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_vl_checkpoint, dtype=torch.float32).eval()
    return model, tf.Qwen2VLImageProcessorPil()


def hf_inputs(processor, prompt: list[int], images: list) -> dict:
    """What transformers' processor would hand its model: placeholders expanded, token types."""
    ids: list[int] = []
    out = processor(images=images, return_tensors="pt") if images else None
    k = 0
    for t in prompt:
        if t == IMG:
            ids += [IMG] * int(out["image_grid_thw"][k].prod() // 4)
            k += 1
        else:
            ids.append(t)
    x = torch.tensor([ids])
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x))
    if images:
        kw.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"], mm_token_type_ids=(x == IMG).long())
    return kw


def hf_greedy(reference, prompt: list[int], images: list) -> list[int]:
    model, processor = reference
    kw = hf_inputs(processor, prompt, images)
    with torch.no_grad():
        gen = model.generate(**kw, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return gen[0, kw["input_ids"].shape[1]:].tolist()


def run(engine, requests: list[tuple[list[int], list]], prefix: str = "r") -> list[list[int]]:
    return run_mm_requests(engine, requests, GREEDY, prefix)


# Image sizes: 112 x 168 is 8 x 12 patches, 24 tokens in 2 x 3 windows; 56 x 84 is 4 x 6 patches,
# 6 tokens, its second window cut at the edge.
CASES = {
    "text_only": ([5, 6, 7, 8, 9], []),
    "one_image": ([5, START, IMG, END, 9, 10, 11], [image(112, 168, 1)]),
    "image_first": ([START, IMG, END, 3, 4], [image(168, 112, 2)]),
    "image_last": ([7, 8, START, IMG, END], [image(112, 112, 3)]),
    "two_images_of_different_sizes": ([1, START, IMG, END, 2, START, IMG, END, 3], [image(56, 84, 4), image(112, 168, 5)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, tiny_qwen_vl_checkpoint, make_engine, reference):
    prompt, images = CASES[case]
    engine = make_engine(tiny_qwen_vl_checkpoint)
    assert run(engine, [(prompt, images)]) == [hf_greedy(reference, prompt, images)]


def test_mixed_batch_with_chunk_boundaries_inside_images(tiny_qwen_vl_checkpoint, make_engine, reference):
    # A 7-token budget splits each image's placeholder run over several steps, and text and image
    # requests share steps; no prefix cache, so every image token is computed.
    cases = [CASES["one_image"], CASES["text_only"], CASES["two_images_of_different_sizes"], CASES["image_last"]]
    engine = make_engine(tiny_qwen_vl_checkpoint, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert run(engine, cases) == [hf_greedy(reference, p, ims) for p, ims in cases]
    cache = engine.runner.encoder_cache
    assert cache.misses == 4 and cache.hits > 0  # each image encoded once, sliced by later chunks


def test_images_change_the_output(tiny_qwen_vl_checkpoint, make_engine):
    engine = make_engine(tiny_qwen_vl_checkpoint)
    prompt = CASES["one_image"][0]
    a, b = run(engine, [(prompt, [image(112, 168, 1)]), (prompt, [image(112, 168, 9)])])
    assert a != b


def test_prefix_cache_is_keyed_by_image_content(tiny_qwen_vl_checkpoint, make_engine, reference):
    # 40 tokens of text, then a 36-token image (168 x 168), then the question: blocks of 16.
    head = list(range(10, 50))
    same, other = image(168, 168, 7), image(168, 168, 8)
    q1, q2 = head + [START, IMG, END, 60, 61], head + [START, IMG, END, 70, 71, 72]
    engine = make_engine(tiny_qwen_vl_checkpoint)
    assert run(engine, [(q1, [same])], "a") == [hf_greedy(reference, q1, [same])]
    hits0 = engine.stats().prefix_cache_hits
    # The same image with another question: the blocks through the image come from the cache.
    engine.add_request("b", q2, GREEDY, multi_modal_data={"image": [same]})
    out = drain_request(engine, "b")
    assert out.outputs[0].token_ids == tuple(hf_greedy(reference, q2, [same]))
    # 4 full blocks: the text, the vision start and 23 of the image's 36 tokens.
    assert out.num_cached_tokens == 64
    # A different image of the same size: only the two text-only blocks before it may be shared.
    engine.add_request("c", q2, GREEDY, multi_modal_data={"image": [other]})
    out = drain_request(engine, "c")
    assert out.num_cached_tokens == 32
    assert out.outputs[0].token_ids == tuple(hf_greedy(reference, q2, [other]))
    assert engine.stats().prefix_cache_hits - hits0 == 4 + 2


def test_vision_features_and_rotary_positions_match_transformers(tiny_qwen_vl_checkpoint, make_engine, reference):
    model, processor = reference
    engine = make_engine(tiny_qwen_vl_checkpoint)
    prompt, images = CASES["two_images_of_different_sizes"]
    kw = hf_inputs(processor, prompt, images)
    with torch.no_grad():
        ref_pos, ref_delta = model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"])
        ref_feats = model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"], return_dict=True).pooler_output
    token_ids, items, mrope = engine._multimodal_prompt(list(prompt), {"image": images})
    assert token_ids == kw["input_ids"][0].tolist()
    assert [it.grid_thw for it in items] == [tuple(g) for g in kw["image_grid_thw"].tolist()]
    assert torch.equal(items[1].pixel_values, kw["pixel_values"][24:])  # the processor's own pixels
    assert torch.equal(mrope.positions, ref_pos[:, 0])
    assert mrope.delta == int(ref_delta)
    ours = engine.runner.model.encode_images([it.pixel_values for it in items], [it.grid_thw for it in items])
    assert len(ours) == len(ref_feats) == 2
    for a, b in zip(ours, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    # The step's rotary tables for those positions against transformers' 3D rotary.
    rope = engine.runner.model.rope
    step = rope.step_rope(mrope.positions)
    with torch.no_grad():
        cos, sin = model.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), ref_pos)
    torch.testing.assert_close(step.cos, cos[0], rtol=1e-5, atol=1e-6)
    half = rope.head_dim // 2  # our sin table carries rotate-half's minus sign on its first half
    torch.testing.assert_close(step.sin, torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1), rtol=1e-5, atol=1e-6)
    # A text token's axes agree: its row of the plain table is the same rotation.
    text_rows = (mrope.positions == mrope.positions[0]).all(0)
    plain_cos, _ = rope.cos_sin(mrope.positions[0, text_rows])
    torch.testing.assert_close(step.cos[text_rows], plain_cos[:, 0])


def test_checkpoint_loads_with_no_missing_or_unused_weight(tiny_qwen_vl_checkpoint, reference):
    from engine.loader import iter_weights, load_config
    from engine.models.registry import build_model
    from pdcommon.model_files import flatten_text_config

    hf = flatten_text_config(load_config(tiny_qwen_vl_checkpoint))
    weights = dict(iter_weights(tiny_qwen_vl_checkpoint))
    model = build_model(ARCH, hf)
    model.load_weights(weights.items(), torch.float32)  # raises on a missing or an unused weight
    ref = dict(reference[0].named_parameters())
    assert torch.equal(model.visual.patch_embed.weight, ref["model.visual.patch_embed.proj.weight"].flatten(1))
    assert model.layers[0].self_attn.o_proj.bias is None and model.layers[0].self_attn.qkv_proj.bias is not None
    assert torch.equal(model.layers[0].self_attn.qkv_proj.bias[:64], ref["model.language_model.layers.0.self_attn.q_proj.bias"])

    # transformers' in-memory names load the same.
    renamed = {("model." + n) if n.startswith("visual.") else n.replace("model.", "model.language_model.", 1): t
               for n, t in weights.items()}
    build_model(ARCH, hf).load_weights(renamed.items(), torch.float32)

    missing = {n: t for n, t in weights.items() if n != "visual.blocks.2.mlp.up_proj.bias"}
    with pytest.raises(ValueError, match="missing weight 'visual.blocks.2.mlp.up_proj.bias'"):
        build_model(ARCH, hf).load_weights(missing.items(), torch.float32)
    for extra in ("visual.blocks.9.norm1.weight", "model.layers.0.self_attn.o_proj.bias"):
        with pytest.raises(ValueError, match="does not use"):
            build_model(ARCH, hf).load_weights([*weights.items(), (extra, torch.zeros(64))], torch.float32)


def test_unsupported_configs_are_clear_errors(tiny_qwen_vl_checkpoint):
    from engine.loader import load_config
    from engine.models.registry import build_model
    from pdcommon.model_files import flatten_text_config

    hf = flatten_text_config(load_config(tiny_qwen_vl_checkpoint))
    bad = [
        ({"use_sliding_window": True, "sliding_window": 64, "layer_types": ["sliding_attention"] * 3}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 4]}}, "mrope_section"),
        ({"vision_config": {**hf["vision_config"], "out_hidden_size": 32}}, "out_hidden_size"),
        ({"vision_config": {**hf["vision_config"], "hidden_act": "gelu"}}, "hidden_act"),
        ({"vision_config": None}, "vision_config"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            build_model(ARCH, {**hf, **change})
    # The older config spelling (rope_scaling type "mrope", rope_theta at the top) is accepted.
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    model = build_model(ARCH, {**old, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 5e5})
    assert model.rope.section == (2, 3, 3) and model.rope.theta == 5e5
