"""The engine on CUDA (run only where a GPU exists): same greedy tokens as transformers."""
from __future__ import annotations

import pytest

from engine import SamplingParams
from tests.conftest import run_to_completion

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "ernie45_moe"])
def test_cuda_greedy_matches_cpu_reference(arch, tiny_checkpoint, make_engine):
    path = tiny_checkpoint(arch)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 50))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cpu = run_to_completion(make_engine(path), prompts, params, "c")
    cuda = run_to_completion(make_engine(path, device="cuda"), prompts, params, "g")
    assert cuda == cpu


def test_cuda_bf16_default_model_answers_paris():
    from engine import LLM

    llm = LLM(device="cuda")
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
