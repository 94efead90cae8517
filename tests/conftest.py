"""Shared builders: tiny random checkpoints made with transformers' own config classes, and the
engine leak check that every engine test ends with."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # A wide init makes the next-token distribution peaked, so greedy ties (which would make
    # token-for-token comparisons flaky) do not happen.
    initializer_range=0.3,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY_COMMON, tie_word_embeddings=False, rope_theta=10000.0), tf.LlamaForCausalLM
    if arch == "llama_tied":
        return tf.LlamaConfig(**TINY_COMMON, tie_word_embeddings=True), tf.LlamaForCausalLM
    if arch == "ernie45":
        return tf.Ernie4_5Config(**TINY_COMMON, head_dim=16, use_bias=True), tf.Ernie4_5ForCausalLM
    if arch == "ernie45_moe":
        cfg = tf.Ernie4_5_MoeConfig(
            **TINY_COMMON, moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
            moe_layer_start_index=1,
        )
        return cfg, tf.Ernie4_5_MoeForCausalLM
    # head_dim 32 != hidden_size / heads (16): the explicit head_dim must be honoured.
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY_COMMON, head_dim=32, attention_bias=True), tf.Qwen3ForCausalLM
    if arch == "qwen3_moe":
        # Layer 0 dense (mlp_only_layers), layers 1 and 2 MoE, as in the tiny ERNIE-4.5 MoE.
        cfg = tf.Qwen3MoeConfig(
            **TINY_COMMON, head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[0],
        )
        return cfg, tf.Qwen3MoeForCausalLM
    raise ValueError(arch)


def build_tiny_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny randomly initialised float32 checkpoint of `arch` into `folder`."""
    cfg, cls = _config(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if arch == "ernie45_moe":
        # A non-zero correction bias exercises the biased top-k selection.
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "moe_statics"):
                    gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
    if arch in ("qwen3", "qwen3_moe"):
        # q_norm/k_norm start at ones; random weights check they are loaded and applied per head.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.2)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    return folder


_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint("llama" | "llama_tied" | "ernie45" | "ernie45_moe" | "qwen3" | "qwen3_moe") -> folder,
    built once per session."""

    def make(arch: str) -> Path:
        if arch not in _CACHE:
            _CACHE[arch] = build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch))
        return _CACHE[arch]

    return make


@pytest.fixture
def exact_fp32():
    """Quantized layers compute float32 activations exactly (no bf16 cast around the kernel)."""
    from engine.layers.quant import WeightOnlyLinear

    old = WeightOnlyLinear.fp32_exact
    WeightOnlyLinear.fp32_exact = True
    yield
    WeightOnlyLinear.fp32_exact = old


def assert_no_leaks(engine) -> None:
    problems = engine.leaks()
    assert not problems, "engine leaked: " + "; ".join(problems)


@pytest.fixture
def make_engine():
    """Builds LLMEngines (tokenizer-less, float32 by default) and leak-checks each after the test."""
    from engine import LLMEngine

    engines = []

    def make(path: Path, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("num_kv_blocks", 256)
        kwargs.setdefault("max_model_len", 512)
        eng = LLMEngine.from_args(str(path), **kwargs)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        assert_no_leaks(eng)


def run_to_completion(engine, prompts, params, prefix="r") -> list[list[int]]:
    """Add every prompt, step until all finish; returns output token ids per prompt (index 0)."""
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for rid, p, sp in zip(ids, prompts, plist):
        engine.add_request(rid, p, sp)
    result: dict[str, list[int]] = {}
    for _ in range(100_000):
        for out in engine.step():
            if out.finished:
                result[out.request_id] = list(out.outputs[0].token_ids)
        if len(result) == len(ids) and not engine.has_unfinished_requests():
            break
    return [result[i] for i in ids]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available; elsewhere they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----- real Redis -----
@pytest.fixture(scope="session")
def redis_server():
    """A real `redis-server` on a free loopback port for the whole session (a RedisServer)."""
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied before the test (restarted first if a test stopped it)."""
    redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    yield redis_server.url


def fuse_experts(src: Path, dst: Path) -> Path:
    """Copy checkpoint `src` to `dst` with each layer's experts stored fused (transformers'
    in-memory names: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(src / "config.json", dst / "config.json")
    fused: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in load_file(src / "model.safetensors").items():
        m = pattern.fullmatch(name)
        if m is None:
            fused[name] = t
        else:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
    for prefix, experts in groups.items():
        order = sorted(experts)
        fused[prefix + ".gate_up_proj"] = torch.stack([torch.cat([experts[j]["gate_proj"], experts[j]["up_proj"]]) for j in order])
        fused[prefix + ".down_proj"] = torch.stack([experts[j]["down_proj"] for j in order])
    save_file(fused, dst / "model.safetensors")
    return dst


# ----- multimodal requests -----
def random_image(h: int, w: int, seed: int):
    """An h x w RGB PIL image of uniform noise."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def run_mm_requests(engine, requests, params, prefix: str = "r") -> list[list[int]]:
    """Add each (prompt token ids, images) request, step until all finish; output ids per request."""
    for i, (prompt, images) in enumerate(requests):
        engine.add_request(f"{prefix}{i}", prompt, params, multi_modal_data={"image": images} if images else None)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"{prefix}{i}"] for i in range(len(requests))]


def drain_request(engine, rid: str):
    """Step until nothing is left; the finished output of request `rid`."""
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                last = out
    return last


# ----- a tiny ERNIE-4.5-VL (vision tower, resampler, modality-isolated MoE, 3D rotary) -----
VL_TOKENS = dict(image_token_id=290, image_start_token_id=291, image_end_token_id=292, video_token_id=293,
                 video_start_token_id=294, video_end_token_id=295)


def build_tiny_vl_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random Ernie4_5_VLMoeForConditionalGeneration saved with transformers' save_pretrained
    (which writes the original checkpoint layout: one expert list, transposed routers)."""
    import transformers as tf

    text = dict(TINY_COMMON, vocab_size=300, max_position_embeddings=1024, use_bias=False,
                moe_intermediate_size=[32, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_merge_size=2, hidden_act="quick_gelu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = tf.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **VL_TOKENS)
    torch.manual_seed(seed)
    model = tf.Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Non-zero correction biases, different for text and vision: both must be loaded and used.
        for layer in model.model.language_model.layers:
            for part in ("text_moe", "vision_moe"):
                moe = getattr(layer.mlp, part, None)
                if moe is not None:
                    moe.gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vl_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_vl_checkpoint(tmp_path_factory.mktemp("ernie45_vl"))


def with_vl_tokenizer(src: Path, dst: Path) -> Path:
    """Copy the tiny VL checkpoint to `dst` with a word-level tokenizer ("t0".."t287", "user",
    "assistant", the image tokens) and a chat template that renders an image part as start,
    placeholder, end."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    vocab = {f"t{i}": i for i in range(288)}
    vocab.update({"user": 288, "assistant": 289, "<|image@placeholder|>": VL_TOKENS["image_token_id"],
                  "<|IMAGE_START|>": VL_TOKENS["image_start_token_id"], "<|IMAGE_END|>": VL_TOKENS["image_end_token_id"],
                  "[UNK]": 293})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}{{ m.role }} {% if m.content is string %}{{ m.content }} {% else %}"
        "{% for p in m.content %}{% if p.type == 'image' %}<|IMAGE_START|> <|image@placeholder|> <|IMAGE_END|> "
        "{% else %}{{ p.text }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")
    fast.save_pretrained(dst)
    return dst


# ----- a tiny Qwen2.5-VL (windowed ViT, patch merger, Qwen2 dense decoder, chunked 3D rotary) -----
QWEN_VL_TOKENS = dict(image_token_id=290, vision_start_token_id=291, vision_end_token_id=292, video_token_id=293)


def build_tiny_qwen_vl_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2_5_VLForConditionalGeneration saved with transformers' save_pretrained.

    The vision window is 56 pixels (2 x 2 merge groups), so a 112 x 168 image has 6 windows and an
    84-pixel side a partial one; blocks 1 and 3 attend over the whole image. A wide vision init
    makes the image tokens large enough to change the greedy output."""
    import transformers as tf

    text = dict(TINY_COMMON, vocab_size=300, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=TINY_COMMON["hidden_size"],
                  fullatt_block_indexes=[1, 3], hidden_act="silu", initializer_range=0.2)
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_VL_TOKENS)
    torch.manual_seed(seed)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # The norms start at ones; random weights check each is loaded and applied.
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight")):
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):  # zeros at init: random ones check the q/k/v and vision biases
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen_vl_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"))
