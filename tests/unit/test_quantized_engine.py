"""Weight-only quantized engines (quantization="wint8" | "wint4") on the tiny random checkpoints.

The tiny checkpoints are deliberately peaked (initializer_range=0.3), which also makes them
chaotic: a ~1% change in one layer's output moves later logits a lot, and free-running greedy
sequences diverge after a few tokens even for wint8 (measured: 20-50% of positions agree).
So closeness to the unquantized model is measured with teacher forcing (every position of a
fixed sequence scored in one prefill), and the exactness of the quantized layers is checked
separately against a float32 engine whose weights were replaced by the dequantized ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, LLMEngine, SamplingParams
from engine.layers.quant import WeightOnlyLinear, dequantize
from tests.conftest import run_to_completion

METHODS = ("wint8", "wint4")
DTYPES = ("float32", "bfloat16")
ARCHS = ("llama", "ernie45_moe")
PROMPTS = [[(7 * i + 13 * j) % 256 for j in range(5 + 7 * i)] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

# Thresholds vs the unquantized engine of the same dtype, teacher-forced over PROMPTS plus the
# baseline's 24 greedy tokens. Measured (llama / ernie45_moe, fp32 and bf16):
#   wint8: mean cosine 0.997, last-prompt-token cosine >= 0.997, top-1 agreement 0.85-0.93
#   wint4: mean cosine 0.77-0.80, top-1 agreement 0.24-0.44
# wint4's low numbers are this chaotic model's sensitivity, not a broken layer: against the
# dequantized-weight reference wint4 scores cosine >= 0.99 (test_matches_dequantized_reference);
# on the real default model see benchmarks/quant_quality.py.
MEAN_COS = {"wint8": 0.99, "wint4": 0.6}
# wint4 on these random tiny models is chaotic per position (one prompt's last-token cosine swung
# from 0.5 to 0.05 between group sizes 128 and 32, although group 32 has the smaller weight
# error): only its mean is checked here; its real quality is checked on the default model.
LAST_COS = {"wint8": 0.99}
TOP1 = {"wint8": 0.75}


def quantized_modules(engine: LLMEngine) -> dict[str, WeightOnlyLinear]:
    return {n: m for n, m in engine.runner.model.named_modules() if isinstance(m, WeightOnlyLinear)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_engine_runs_and_replaces_linears(arch, dtype, method, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    base = make_engine(path, dtype=dtype)
    eng = make_engine(path, dtype=dtype, quantization=method)
    model = eng.runner.model
    linears = {n for n, m in base.runner.model.named_modules() if isinstance(m, torch.nn.Linear)}
    quant = quantized_modules(eng)
    # Every linear layer except the LM head was swapped, and nothing else.
    assert len(quant) > 0
    assert set(quant) == linears - {"lm_head"}
    assert all(m.method == method for m in quant.values())
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["lm_head"]
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    assert torch.equal(model.lm_head.weight, base.runner.model.lm_head.weight)
    if arch == "ernie45_moe":  # routed experts stay float stacked Parameters (not quantized)
        experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
        assert experts and all(e.gate_up.dtype == getattr(torch, dtype) for e in experts)
    # The quantized layers hold fewer bytes than the float ones they replaced.
    base_mods = dict(base.runner.model.named_modules())
    qbytes = sum(m.quantized_nbytes() for m in quant.values())
    fbytes = sum(p.numel() * p.element_size() for n in quant for p in base_mods[n].parameters())
    assert qbytes < fbytes * (0.6 if method == "wint8" else 0.4)

    outs = run_to_completion(eng, PROMPTS, GREEDY)
    assert [len(o) for o in outs] == [24] * len(PROMPTS)
    assert all(0 <= t < 256 for o in outs for t in o)


def test_tied_lm_head_stays_tied(tiny_checkpoint, make_engine):
    eng = make_engine(tiny_checkpoint("llama_tied"), quantization="wint8")
    model = eng.runner.model
    assert model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.lm_head, torch.nn.Linear)
    run_to_completion(eng, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_dequantized_reference(arch, method, tiny_checkpoint, make_engine, exact_fp32):
    """float32 activations computed exactly: the quantized engine is the float model run with the
    dequantized weights, to float32 rounding."""
    path = tiny_checkpoint(arch)
    eng = make_engine(path, quantization=method)
    ref = make_engine(path)
    ref_mods = dict(ref.runner.model.named_modules())
    with torch.no_grad():
        for name, m in quantized_modules(eng).items():
            ref_mods[name].weight.copy_(dequantize(m))
    toks = run_to_completion(ref, PROMPTS, GREEDY)
    assert run_to_completion(eng, PROMPTS, GREEDY) == toks
    for p, t in zip(PROMPTS, toks):
        a, b = eng.score(p + t), ref.score(p + t)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_logits_close_to_unquantized(arch, dtype, method, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    base = make_engine(path, dtype=dtype)
    eng = make_engine(path, dtype=dtype, quantization=method)
    toks = run_to_completion(base, PROMPTS, GREEDY)
    cos, last, agree = [], [], []
    for p, t in zip(PROMPTS, toks):
        q, b = eng.score(p + t), base.score(p + t)
        c = F.cosine_similarity(q, b, dim=-1)
        cos.append(c)
        last.append(c[len(p) - 1])  # the prompt's last token: what the first sampled token comes from
        # Teacher-forced greedy: would the quantized model pick the baseline's next token?
        agree.append(q[len(p) - 1 : -1].argmax(-1) == torch.tensor(t))
        # Sanity: the baseline's greedy token is its teacher-forced top choice, up to rounding. In
        # float32 exactly; in bf16 a one-row decode step and a many-row prefill round differently,
        # so a near-tie may go either way: the greedy token must then be within a few bf16
        # steps of the best logit.
        rows = b[len(p) - 1 : -1]
        picked = rows.gather(1, torch.tensor(t)[:, None]).squeeze(1)
        best = rows.max(-1).values
        slack = 0.0 if dtype == "float32" else 4 * 2.0**-8 * float(best.abs().max())
        assert bool((picked >= best - slack).all()), (picked - best).tolist()
    mean_cos = torch.cat(cos).mean().item()
    assert mean_cos > MEAN_COS[method], f"mean cosine {mean_cos:.4f}"
    if method in LAST_COS:
        assert min(last).item() > LAST_COS[method], f"last-token cosines {[round(x.item(), 4) for x in last]}"
    if method in TOP1:
        frac = torch.cat(agree).float().mean().item()
        assert frac > TOP1[method], f"teacher-forced greedy agreement {frac:.3f}"


@pytest.mark.parametrize("bad", ["int8", "WINT8", "fp8", "wint2", ""])
def test_unknown_quantization_is_a_value_error(bad, tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="wint8, wint4"):
        LLMEngine.from_args(path, dtype="float32", quantization=bad, num_kv_blocks=16)
    with pytest.raises(ValueError, match=r"quantization .* not supported.*wint8.*wint4"):
        LLM(path, dtype="float32", quantization=bad, num_kv_blocks=16)
