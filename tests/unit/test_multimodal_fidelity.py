"""ERNIE-4.5-VL with images: greedy tokens, vision features and 3D rotary positions against
transformers' own model and image processor (float32), chunked prefill through an image, the
prefix and encoder caches keyed by image content, and bad multimodal input."""
from __future__ import annotations

import io

import pytest
import torch

from engine import SamplingParams
from tests.conftest import VL_TOKENS, assert_no_leaks, drain_request, random_image, run_mm_requests, with_vl_tokenizer

IMG, START, END = VL_TOKENS["image_token_id"], VL_TOKENS["image_start_token_id"], VL_TOKENS["image_end_token_id"]
N_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)


image = random_image


@pytest.fixture(scope="module")
def reference(tiny_vl_checkpoint):
    import transformers as tf

    model = tf.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tiny_vl_checkpoint, dtype=torch.float32).eval()
    return model, tf.Ernie4_5_VLMoeImageProcessorPil()


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
        kw.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                  mm_token_type_ids=(x == IMG).long(), moe_mm_token_type_ids=((x == IMG) | (x == START) | (x == END)).long())
    return kw


def hf_greedy(reference, prompt: list[int], images: list) -> list[int]:
    model, processor = reference
    kw = hf_inputs(processor, prompt, images)
    with torch.no_grad():
        gen = model.generate(**kw, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return gen[0, kw["input_ids"].shape[1]:].tolist()


def run(engine, requests: list[tuple[list[int], list]], prefix: str = "r") -> list[list[int]]:
    return run_mm_requests(engine, requests, GREEDY, prefix)


CASES = {
    "text_only": ([5, 6, 7, 8, 9], []),
    "one_image": ([5, START, IMG, END, 9, 10, 11], [image(112, 168, 1)]),
    "image_first": ([START, IMG, END, 3, 4], [image(168, 112, 2)]),
    "image_last": ([7, 8, START, IMG, END], [image(112, 112, 3)]),
    "two_images_of_different_sizes": ([1, START, IMG, END, 2, START, IMG, END, 3], [image(56, 84, 4), image(112, 168, 5)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, tiny_vl_checkpoint, make_engine, reference):
    prompt, images = CASES[case]
    engine = make_engine(tiny_vl_checkpoint)
    assert run(engine, [(prompt, images)]) == [hf_greedy(reference, prompt, images)]


def test_mixed_batch_with_chunk_boundaries_inside_images(tiny_vl_checkpoint, make_engine, reference):
    # A 7-token budget splits each image's 24 placeholder tokens over several steps, and text and
    # image requests share steps; no prefix cache, so every image token is computed.
    cases = [CASES["one_image"], CASES["text_only"], CASES["two_images_of_different_sizes"], CASES["image_last"]]
    engine = make_engine(tiny_vl_checkpoint, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert run(engine, cases) == [hf_greedy(reference, p, ims) for p, ims in cases]
    cache = engine.runner.encoder_cache
    assert cache.misses == 4 and cache.hits > 0  # each image encoded once, sliced by later chunks


def test_images_change_the_output(tiny_vl_checkpoint, make_engine):
    engine = make_engine(tiny_vl_checkpoint)
    prompt = CASES["one_image"][0]
    a, b = run(engine, [(prompt, [image(112, 168, 1)]), (prompt, [image(112, 168, 9)])])
    assert a != b


def test_prefix_cache_is_keyed_by_image_content(tiny_vl_checkpoint, make_engine, reference):
    # 40 tokens of text, then a 36-token image (168 x 168), then the question: blocks of 16.
    head = list(range(10, 50))
    same, other = image(168, 168, 7), image(168, 168, 8)
    q1, q2 = head + [START, IMG, END, 60, 61], head + [START, IMG, END, 70, 71, 72]
    engine = make_engine(tiny_vl_checkpoint)
    assert run(engine, [(q1, [same])], "a") == [hf_greedy(reference, q1, [same])]
    hits0 = engine.stats().prefix_cache_hits
    # The same image with another question: the blocks through the image come from the cache.
    engine.add_request("b", q2, GREEDY, multi_modal_data={"image": [same]})
    out = _drain(engine, "b")
    assert out.outputs[0].token_ids == tuple(hf_greedy(reference, q2, [same]))
    # 4 full blocks: the text, the image start and 23 of its 36 tokens (the encoder output is sliced).
    assert out.num_cached_tokens == 64
    # A different image of the same size: only the two text-only blocks before it may be shared.
    engine.add_request("c", q2, GREEDY, multi_modal_data={"image": [other]})
    out = _drain(engine, "c")
    assert out.num_cached_tokens == 32
    assert out.outputs[0].token_ids == tuple(hf_greedy(reference, q2, [other]))
    assert engine.stats().prefix_cache_hits - hits0 == 4 + 2


_drain = drain_request


def test_vision_features_and_rotary_positions_match_transformers(tiny_vl_checkpoint, make_engine, reference):
    model, processor = reference
    engine = make_engine(tiny_vl_checkpoint)
    prompt, images = CASES["two_images_of_different_sizes"]
    kw = hf_inputs(processor, prompt, images)
    with torch.no_grad():
        ref_pos, ref_delta = model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"])
        ref_feats = model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"], return_dict=True).pooler_output
    token_ids, items, mrope = engine._multimodal_prompt(list(prompt), {"image": images})
    assert token_ids == kw["input_ids"][0].tolist()
    assert torch.equal(mrope.positions, ref_pos[:, 0])
    assert mrope.delta == int(ref_delta)
    ours = engine.runner.model.encode_images([it.pixel_values for it in items], [it.grid_thw for it in items])
    for a, b in zip(ours, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_multimodal_input_is_a_clear_error(tiny_vl_checkpoint, make_engine, tiny_checkpoint):
    engine = make_engine(tiny_vl_checkpoint)
    img = image(56, 56, 0)
    with pytest.raises(ValueError, match="1 image placeholder"):
        engine.add_request("x", [1, START, IMG, END], GREEDY, multi_modal_data={"image": [img, img]})
    with pytest.raises(ValueError, match="video is not supported"):
        engine.add_request("x", [1, 2], GREEDY, multi_modal_data={"video": [b"..."]})
    with pytest.raises(ValueError, match="cannot decode"):
        engine.add_request("x", [1, IMG], GREEDY, multi_modal_data={"image": b"not an image"})
    buf = io.BytesIO()
    image(56, 56, 0).save(buf, format="PNG")
    with pytest.raises(ValueError, match="cannot decode"):
        engine.add_request("x", [1, IMG], GREEDY, multi_modal_data={"image": buf.getvalue()[:60]})  # truncated
    with pytest.raises(ValueError, match="aspect ratio"):
        engine.add_request("x", [1, IMG], GREEDY, multi_modal_data={"image": image(28, 28 * 210, 0)})
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", [1, IMG], GREEDY, multi_modal_data={"image": image(28 * 24, 28 * 24, 0)})
    assert_no_leaks(engine)
    text_only = make_engine(tiny_checkpoint("ernie45_moe"))
    with pytest.raises(ValueError, match="takes text only"):
        text_only.add_request("x", [1, 2], GREEDY, multi_modal_data={"image": [img]})
    # Encoded bytes are accepted as well as PIL images, and the request then runs.
    run(engine, [([1, START, IMG, END], [buf.getvalue()])])


def test_block_hashes_mix_in_image_content():
    from pdcommon.block_hash import prefix_block_hashes

    tokens = [1, 2, 3, 4] + [IMG] * 9 + [5, 6, 7]
    text = prefix_block_hashes(tokens, 4)
    a = prefix_block_hashes(tokens, 4, [(4, 8, 111)])
    b = prefix_block_hashes(tokens, 4, [(4, 8, 222)])
    assert a[0] == b[0] == text[0]  # the block before the image
    assert a[1] != b[1] and a[2] != b[2] and a[3] != b[3]  # the image's blocks and everything after
    assert a[1] != text[1]
    # The same image one token later: block 1 holds the same tokens, but is other KV.
    assert prefix_block_hashes(tokens, 4, [(5, 8, 111)])[1] != a[1]


def test_offline_chat_and_generate_with_images(tiny_vl_checkpoint, tmp_path, reference):
    import base64

    from engine import LLM

    buf = io.BytesIO()
    image(112, 168, 1).save(buf, format="PNG")
    png = buf.getvalue()
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    ids = [288, 5, START, IMG, END, 6, 7, 289]  # "user t5 <image> t6 t7 assistant"
    want = hf_greedy(reference, ids, [image(112, 168, 1)])
    with LLM(with_vl_tokenizer(tiny_vl_checkpoint, tmp_path / "m"), dtype="float32", num_kv_blocks=64,
             max_model_len=256) as llm:
        got = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": png}}, GREEDY)
        assert list(got[0].outputs[0].token_ids) == want
        for url in (data_url, str(path), f"file://{path}"):
            msgs = [{"role": "user", "content": [{"type": "text", "text": "t5"}, {"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "t6 t7"}]}]
            (out,) = llm.chat(msgs, GREEDY)
            assert list(out.prompt_token_ids[:3]) == [288, 5, START] and list(out.outputs[0].token_ids) == want
        text = llm.generate({"prompt": "user t5 <|IMAGE_START|> <|image@placeholder|> <|IMAGE_END|> t6 t7 assistant",
                             "multi_modal_data": {"image": [image(112, 168, 1)]}}, GREEDY)
        assert list(text[0].outputs[0].token_ids) == want
        with pytest.raises(ValueError, match="video input is not supported"):
            llm.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])
        with pytest.raises(ValueError, match="fetched by the server"):
            llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        with pytest.raises(ValueError, match="exactly one of"):
            llm.generate({"prompt": "t1", "prompt_token_ids": [1]})
        assert_no_leaks(llm.engine)


def _prefill_and_move(prefill, decode, rid, prompt, images):
    prefill.add_request(rid, prompt, GREEDY, hold_kv=True, multi_modal_data={"image": images})
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    first = outs[-1].outputs[0].token_ids[0]
    spans, delta = prefill.held_kv_multimodal(rid)
    full_prompt = list(outs[-1].prompt_token_ids)
    plan = decode.add_prefilled_request(rid, full_prompt, first, GREEDY, mm_spans=spans, mrope_delta=delta)
    decode.import_kv(rid, prefill.export_kv(rid, start_block=plan.num_cached_blocks), start_block=plan.num_cached_blocks)
    prefill.release_kv(rid)
    decode.finish_kv_import(rid)
    return _drain(decode, rid), plan


def test_disaggregated_prefill_and_decode_of_an_image_prompt(tiny_vl_checkpoint, make_engine, reference):
    # The decode engine gets token ids, KV, the images' spans and the rotary delta; never pixels.
    head = list(range(10, 50))
    q1, q2 = head + [START, IMG, END, 60, 61], head + [START, IMG, END, 70, 71, 72]
    same, other = image(168, 168, 7), image(168, 168, 8)
    prefill, decode = make_engine(tiny_vl_checkpoint), make_engine(tiny_vl_checkpoint)
    out, plan = _prefill_and_move(prefill, decode, "a", q1, [same])
    assert plan.num_cached_blocks == 0
    assert list(out.outputs[0].token_ids) == hf_greedy(reference, q1, [same])
    assert len(decode.runner.encoder_cache) == 0
    # The decode side's own prefix cache knows the image by content: the same image with another
    # question reuses 4 blocks there; a different image of the same size only the 2 text blocks.
    out, plan = _prefill_and_move(prefill, decode, "b", q2, [same])
    assert plan.num_cached_blocks == 4
    assert list(out.outputs[0].token_ids) == hf_greedy(reference, q2, [same])
    out, plan = _prefill_and_move(prefill, decode, "c", q2, [other])
    assert plan.num_cached_blocks == 2
    assert list(out.outputs[0].token_ids) == hf_greedy(reference, q2, [other])
