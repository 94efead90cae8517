"""Greedy tokens and logits of the engine vs transformers' own implementation (float32)."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.conftest import fuse_experts, run_to_completion

ARCHS = ["llama", "llama_tied", "ernie45", "ernie45_moe", "qwen3", "qwen3_moe"]
PROMPT_LENS = [5, 17, 33, 64, 3, 40]


def prompts_for(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(path, prompts, max_new: int) -> list[list[int]]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 min_new_tokens=max_new, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


_REF: dict[str, list[list[int]]] = {}


def reference(path, arch):
    if arch not in _REF:
        _REF[arch] = hf_greedy(path, prompts_for(256), 12)
    return _REF[arch]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    engine = make_engine(path)
    assert run_to_completion(engine, prompts_for(256), GREEDY) == reference(path, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_without_prefix_cache_with_tiny_chunks(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    engine = make_engine(path, enable_prefix_caching=False, max_num_batched_tokens=7, block_size=4)
    assert run_to_completion(engine, prompts_for(256), GREEDY) == reference(path, arch)


@pytest.mark.parametrize("arch", ["llama", "ernie45_moe", "qwen3_moe"])
def test_greedy_matches_under_preemption(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    # 14 blocks of 8 tokens cannot hold all six sequences at once: requests get preempted and recomputed.
    engine = make_engine(path, num_kv_blocks=14, block_size=8)
    assert run_to_completion(engine, prompts_for(256), GREEDY) == reference(path, arch)
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ["llama", "ernie45_moe", "qwen3_moe"])
def test_prefix_cache_hits_give_same_tokens(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    engine = make_engine(path, block_size=4)
    prompts = prompts_for(256)
    first = run_to_completion(engine, prompts, GREEDY, prefix="a")
    hits_before = engine.block_manager.prefix_hits
    second = run_to_completion(engine, prompts, GREEDY, prefix="b")
    assert second == first == reference(path, arch)
    assert engine.block_manager.prefix_hits > hits_before


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_close_to_transformers(arch, tiny_checkpoint, make_engine):
    import transformers as tf

    path = tiny_checkpoint(arch)
    prompt = prompts_for(256)[3]
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    engine = make_engine(path)
    engine.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    out = engine.scheduler.schedule()  # one step: the whole prompt's prefill
    logits = engine.runner.execute(out)[0]
    engine.scheduler.update_after_step(out)
    engine.abort("x")
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_qwen3_moe_fused_expert_names(tiny_checkpoint, make_engine, tmp_path):
    """Experts stored fused (transformers' in-memory names: experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]) load to the same model as the per-expert names save_pretrained writes."""
    src = tiny_checkpoint("qwen3_moe")
    fuse_experts(src, tmp_path)
    tokens = prompts_for(256)[1]
    torch.testing.assert_close(make_engine(tmp_path).score(tokens), make_engine(src).score(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra", [dict(mlp_only_layers=[0]), dict(decoder_sparse_step=2), dict(decoder_sparse_step=2, mlp_only_layers=[3])]
)
def test_qwen3_moe_layers_match_transformers(extra):
    """Which layers are MoE (mlp_only_layers, decoder_sparse_step), read from a saved config.json's
    fields, agrees with transformers' own Qwen3MoeDecoderLayer."""
    import transformers as tf

    from engine.layers.moe import SparseMoE
    from engine.models.registry import build_model

    cfg = tf.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=8, num_experts=4,
                            num_experts_per_tok=2, **extra)
    with torch.device("meta"):
        ref = tf.Qwen3MoeForCausalLM(cfg)
        ours = build_model("Qwen3MoeForCausalLM", cfg.to_dict())
    want = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in ref.model.layers]
    assert [isinstance(layer.mlp, SparseMoE) for layer in ours.layers] == want
    assert any(want) and not all(want)


def test_qwen3_sliding_window_is_rejected():
    import transformers as tf

    from engine.models.registry import build_model

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    with torch.device("meta"):
        build_model("Qwen3ForCausalLM", tf.Qwen3Config(**small, head_dim=8).to_dict())  # no window: fine
        with pytest.raises(ValueError, match="sliding-window"):
            build_model("Qwen3ForCausalLM", tf.Qwen3Config(**small, head_dim=8, use_sliding_window=True,
                                                           max_window_layers=1).to_dict())
        with pytest.raises(ValueError, match="sliding-window"):
            moe = tf.Qwen3MoeConfig(**small, num_experts=4, use_sliding_window=True)
            build_model("Qwen3MoeForCausalLM", moe.to_dict())
