"""Tests for weight-only quantized linear layers (engine/layers/quant.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import quant
from engine.layers.quant import QUANT_METHODS, dequantize, quantize_linear

DTYPES = (torch.float32, torch.bfloat16)
# Shapes [out, in] from SmolLM-135M-like models and tiny test models.
SHAPES = [(1536, 576), (576, 1536), (576, 192), (32, 16), (64, 32), (16, 32), (5, 3), (24, 48), (48, 33)]
# Relative Frobenius error of the output vs F.linear with the original weight.
LOOSE = {"wint8": 0.01, "wint4": 0.10}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", QUANT_METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_close_to_dequantized_and_original(method: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    n, k = shape
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype)
    x = torch.randn(2, 3, k).to(dtype)  # 3-D input
    m = quantize_linear(w, b, method)
    y = m(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    deq = dequantize(m)
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    # Tight: bf16 activation/output rounding only (~2**-9).
    assert _rel(y, F.linear(x.float(), deq, b.float())) < 5e-3
    # Loose: quantization error itself.
    assert _rel(y, F.linear(x.float(), w.float(), b.float())) < LOOSE[method]
    assert _rel(deq, w.float()) < LOOSE[method]


@pytest.mark.parametrize("method", QUANT_METHODS)
@pytest.mark.parametrize("shape", [(1536, 576), (64, 32), (24, 48), (48, 33)])
def test_fp32_exact_matches_dequantized(method: str, shape: tuple[int, int], exact_fp32) -> None:
    n, k = shape
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(7, k)
    m = quantize_linear(w, b, method)
    torch.testing.assert_close(m(x), F.linear(x, dequantize(m), b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", QUANT_METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_batch(method: str, dtype: torch.dtype) -> None:
    """Prefill-sized batches (wint8 switches to dequantize + GEMM there)."""
    w, x = torch.randn(96, 128).to(dtype), torch.randn(300, 128).to(dtype)
    m = quantize_linear(w, None, method)
    y = m(x)
    assert _rel(y, F.linear(x.float(), dequantize(m))) < 5e-3
    assert _rel(y[:5], m(x[:5])) < 5e-3  # same result as the small-batch kernel path


def test_kernels_used_on_model_shapes() -> None:
    """The fast CPU kernels should cover the real model shapes on this torch."""
    if not quant._int8_kernel_ok() or quant._int4_cpu_layout() is None:
        pytest.skip("torch build lacks the CPU weight-only kernels")
    for n, k in [(1536, 576), (576, 1536), (576, 192), (49152 // 64, 576)]:
        w = torch.randn(n, k, dtype=torch.bfloat16)
        assert quantize_linear(w, None, "wint8").use_kernel
        assert quantize_linear(w, None, "wint4").layout == "cpu_kernel"


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="wint8, wint4"):
        quantize_linear(torch.randn(4, 4), None, "int3")


@pytest.mark.parametrize("group_size", [32, 64, 128, 100])
def test_group_size_fallback(group_size: int) -> None:
    w = torch.randn(64, 576)
    m = quantize_linear(w, None, "wint4", group_size=group_size)
    assert 576 % m.group_size == 0 and m.group_size <= group_size
    assert _rel(dequantize(m), w) < 0.10


def test_no_bias_and_2d_and_empty_batch() -> None:
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    for method in QUANT_METHODS:
        m = quantize_linear(w, None, method)
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        assert m(x).shape == (5, 48)
        assert m(x[:0]).shape == (0, 48)


def test_misaligned_input_view() -> None:
    """A contiguous view at an odd offset must not reach the aligned-load kernel."""
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    m = quantize_linear(w, None, "wint8")
    base = torch.randn(4 * 64 + 1, dtype=torch.bfloat16)
    x = base[1:].view(4, 64)
    assert x.data_ptr() % 64
    torch.testing.assert_close(m(x), m(x.clone()))


def test_constant_and_zero_rows() -> None:
    w = torch.randn(32, 64)
    w[0] = 0.0
    w[1] = 0.37
    w[2] = -1.25
    for method in QUANT_METHODS:
        deq = dequantize(quantize_linear(w, None, method))
        torch.testing.assert_close(deq[:3], w[:3], rtol=1e-2, atol=0)


def test_memory_saved() -> None:
    w = torch.randn(1536, 576, dtype=torch.bfloat16)
    orig = w.numel() * w.element_size()
    m8, m4 = quantize_linear(w, None, "wint8"), quantize_linear(w, None, "wint4")
    assert m8.quantized_nbytes() < 0.51 * orig
    assert m4.quantized_nbytes() < 0.30 * orig
    # Only quantized tensors are kept.
    for m in (m8, m4):
        assert not any(p.is_floating_point() and p.numel() == w.numel() for p in m.buffers())
        assert list(m.parameters()) == []


def test_state_dict_roundtrip() -> None:
    w, b = torch.randn(64, 128), torch.randn(64)
    for method in QUANT_METHODS:
        m = quantize_linear(w, b, method)
        m2 = quantize_linear(torch.zeros_like(w), torch.zeros_like(b), method)
        m2.load_state_dict(m.state_dict())
        x = torch.randn(3, 128)
        torch.testing.assert_close(m2(x), m(x))
