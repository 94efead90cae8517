"""LLMEngine behaviour: bad input, abort, and KV export/import across two engine instances."""
from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.conftest import run_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT = list(range(3, 40))  # 37 tokens: 2 full blocks of 16 and a partial one


def test_bad_prompts_raise_and_engine_keeps_serving(tiny_checkpoint, make_engine):
    engine = make_engine(tiny_checkpoint("llama"), max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match=r"prompt has 64 tokens but max_model_len is 64"):
        engine.add_request("b", [1] * 64, GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("c", [1, 99999], GREEDY)
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("d", "text needs a tokenizer", GREEDY)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request("e", [1, 2], {"temperature": 0})
    engine.add_request("dup", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], GREEDY)
    engine.abort("dup")
    # Still serves, and a generation that reaches max_model_len ends with "length".
    (out,) = run_to_completion(engine, [[1] * 60], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    assert len(out) == 4


def test_prompt_larger_than_the_whole_cache_is_rejected(tiny_checkpoint, make_engine):
    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(20)), GREEDY)


def test_abort_frees_blocks_in_every_state(tiny_checkpoint, make_engine):
    engine = make_engine(tiny_checkpoint("llama"), max_num_batched_tokens=8)
    engine.add_request("running", PROMPT, GREEDY)
    engine.add_request("waiting", PROMPT, GREEDY)
    engine.step()  # "running" got a first chunk of 8 tokens, "waiting" nothing
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort("running")
    engine.abort("waiting")
    engine.abort("never-existed")
    assert not engine.has_unfinished_requests()


def test_unschedulable_growth_finishes_with_length(tiny_checkpoint, make_engine):
    # 3 blocks of 4 tokens hold 12 tokens: a 10-token prompt can only grow by 2.
    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=3, block_size=4)
    (out,) = run_to_completion(engine, [list(range(10))], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert 1 <= len(out) < 20


@pytest.mark.parametrize("arch", ["llama", "ernie45_moe"])
def test_export_import_resumes_with_identical_tokens(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    single = make_engine(path)
    (expected,) = run_to_completion(single, [PROMPT], GREEDY)

    prefill, decode = make_engine(path), make_engine(path)
    prefill.add_request("p", PROMPT, GREEDY, hold_kv=True)
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    assert outs[-1].kv_held and outs[-1].finished
    first = outs[-1].outputs[0].token_ids[0]
    src_blocks = prefill.held_kv_blocks("p")
    assert len(src_blocks) == 3

    plan = decode.add_prefilled_request("p", PROMPT, first, GREEDY)
    assert plan.num_cached_blocks == 0
    decode.import_kv("p", prefill.export_kv("p"))
    prefill.release_kv("p")
    decode.finish_kv_import("p")
    tokens = [first]
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens = list(out.outputs[0].token_ids)
    assert tokens == expected
    # Each token is counted once across the pair: the first by prefill, the rest by decode.
    assert prefill.stats().generation_tokens_total + decode.stats().generation_tokens_total == len(expected)

    # Second time, the decode engine has the prompt's full blocks in its prefix cache and
    # needs only the tail block from the prefill engine.
    prefill.add_request("p2", PROMPT, GREEDY, hold_kv=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    plan = decode.add_prefilled_request("p2", PROMPT, first, GREEDY)
    assert plan.num_cached_blocks == 2
    decode.import_kv("p2", prefill.export_kv("p2", start_block=2), start_block=2)
    prefill.release_kv("p2")
    decode.finish_kv_import("p2")
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens = list(out.outputs[0].token_ids)
    assert tokens == expected


def test_export_into_caller_buffer_and_shape_checks(tiny_checkpoint, make_engine):
    engine = make_engine(tiny_checkpoint("llama"))
    engine.add_request("p", PROMPT, GREEDY, hold_kv=True)
    while engine.has_unfinished_requests():
        engine.step()
    n = len(engine.held_kv_blocks("p"))
    buf = torch.empty(3, n, 2, 16, 2, 16, dtype=torch.float32)
    assert engine.export_kv("p", out=buf) is buf
    assert buf.abs().sum() > 0
    with pytest.raises(ValueError, match="export buffer"):
        engine.export_kv("p", out=torch.empty(1, 1))
    with pytest.raises(ValueError, match="not holding KV"):
        engine.export_kv("nope")
    engine.abort("p")


def test_unknown_architecture_and_bad_options_are_clear_errors(tiny_checkpoint, tmp_path):
    import json
    import shutil

    src = tiny_checkpoint("llama")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"FooForCausalLM.*supported: Ernie4_5ForCausalLM, Ernie4_5_MoeForCausalLM, Ernie4_5_VLMoeForConditionalGeneration, .*LlamaForCausalLM, Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM"):
        LLMEngine.from_args(str(bad), dtype="float32", num_kv_blocks=8)
    with pytest.raises(ValueError, match="dtype 'float16'"):
        LLMEngine.from_args(str(src), dtype="float16", num_kv_blocks=8)
    with pytest.raises(ValueError, match="quantization 'int3'"):
        LLMEngine.from_args(str(src), quantization="int3", num_kv_blocks=8)
    with pytest.raises(ValueError, match="max_model_len=100000 exceeds"):
        LLMEngine.from_args(str(src), max_model_len=100000, num_kv_blocks=8)
    with pytest.raises(ValueError, match="block_size=12"):
        LLMEngine.from_args(str(src), block_size=12, num_kv_blocks=8)
    with pytest.raises(FileNotFoundError):
        LLMEngine.from_args(str(tmp_path / "missing"))
