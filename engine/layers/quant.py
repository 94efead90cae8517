"""Weight-only quantized linear layers (``--quantization wint8|wint4``).

Names follow Baidu FastDeploy: *wint8* / *wint4* quantize only the weights;
activations stay in the model's float dtype.

* ``wint8``: symmetric per-output-channel int8, ``w ~= q * scale``.
* ``wint4``: asymmetric group-wise 4-bit along in_features,
  ``w ~= (q - 8) * scale + zero`` with ``q`` in [0, 15] (the convention of
  torch's CPU int4 kernel, so the same parameters serve the kernel and the
  fallback).

On CPU the fast paths are torch's weight-only kernels
(``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``).
On x86 both are vectorized only for bfloat16 activations (fp32/fp16 run a
scalar loop ~10x slower than ``F.linear``), so non-bf16 activations are cast
to bf16 around the kernel by default. That rounding (~2**-9 relative) is small
next to the weight quantization error; set ``WeightOnlyLinear.fp32_exact =
True`` to compute non-bf16 activations in fp32 instead (slower, matches
``F.linear(x, dequantize(m))`` to fp32 rounding).

Shapes the kernels cannot take (tiny or odd dimensions, non-CPU devices) use a
dequantize-on-the-fly fallback that computes in fp32; so do wint8 batches of
``_INT8_GEMM_MIN_ROWS`` or more rows, where an fp32 GEMM is faster.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_ops

logger = logging.getLogger(__name__)

@functools.cache
def int4_gemv_max_rows() -> int:
    """Rows up to which wint4 runs pdserve's 4-bit GEMV (engine/kernels/csrc/gemv_int4.cpp), which
    streams the nibbles once per call; more rows take torch's int4 kernel or the fallback.
    `PDSERVE_INT4_GEMV_MAX_ROWS` overrides."""
    env = os.environ.get("PDSERVE_INT4_GEMV_MAX_ROWS")
    if env:
        return int(env)
    ops = cpu_ops()
    if ops is not None and ops.isa() == "avx512_bf16":
        # AVX-512 BF16 without AMX (AMD Zen 4), 30 layers of the default model's shapes: 1.35-1.6x
        # torch's int4 kernel at every row count from 4 to 256 (benchmarks/int4_rows.py).
        return 512
    # AMX and AVX2 hosts: from ~4 rows both kernels are compute-bound and were measured even on an
    # AMX host (at 1 row this one is ~1.6x).
    return 4

QUANT_METHODS = ("wint8", "wint4")

# Group sizes the CPU int4 kernel accepts (it also needs in_features % group == 0).
_INT4_KERNEL_GROUPS = (256, 128, 64, 32)
# Extra, smaller groups the fallback may use for tiny layers.
_INT4_FALLBACK_GROUPS = (256, 128, 64, 32, 16)
# torch allocations are 64-byte aligned; the AVX-512 int8 kernel uses aligned
# 32-byte loads on activation rows and 16-byte loads on weight rows.
_ALIGN = 64
# Range shrink factors tried per int4 group (lowest squared error wins).
_INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
# From this many rows on, wint8 dequantizes and runs an fp32 GEMM: the int8
# kernel is GEMV-style (4-row tiles) and loses to BLAS for prefill-sized
# batches (AVX2, 1536x576: M=128 8.7 ms vs 6.7 ms, M=512 34 ms vs 22 ms).
_INT8_GEMM_MIN_ROWS = 128
# Weight elements quantized at once (1 MiB fp32 temporaries).
_QUANT_CHUNK_ELEMS = 1 << 18


# --------------------------------------------------------------------------- kernels probes


@functools.lru_cache(maxsize=None)
def _int8_kernel_ok() -> bool:
    """True if ``_weight_int8pack_mm`` exists and is numerically right for bf16."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
        s = (torch.rand(48, generator=gen) + 0.5).to(torch.bfloat16)
        x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
        y = op(x, q, s).float()
        ref = x.float() @ (q.float() * s.float()[:, None]).t()
        ok = bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()))
    except Exception as exc:  # a build without the CPU kernel raises here
        logger.info("int8 weight-only kernel unavailable: %s", exc)
        return False
    if not ok:
        logger.warning("int8 weight-only kernel gave wrong results; using fallback")
    return ok


def _unpack_int4_cpu(flat: torch.Tensor, n: int, k: int, block_n: int, style: str) -> torch.Tensor:
    """Undo ``_convert_weight_to_int4pack_for_cpu`` for one candidate layout.

    The packed buffer is ``{N/block_n, K, block_n/2}`` bytes. Full blocks hold
    either adjacent output channels per byte (``pairs``) or channel ``d`` and
    ``d + block_n/2`` (``halves``, the AVX2/AVX-512 layouts); a partial last
    block is always ``pairs``. Returns ``q`` as uint8 [n, k].
    """
    nf, tail = divmod(n, block_n)
    cut = nf * k * block_n // 2
    parts = []
    if nf:
        full = flat[:cut].view(nf, k, block_n // 2)
        lo, hi = full & 15, full >> 4
        if style == "halves":
            vals = torch.cat([lo, hi], dim=-1)
        else:
            vals = torch.stack([lo, hi], dim=-1).reshape(nf, k, block_n)
        parts.append(vals.permute(0, 2, 1).reshape(nf * block_n, k))
    if tail:
        t = flat[cut:].view(k, tail // 2)
        vals = torch.stack([t & 15, t >> 4], dim=-1).reshape(k, tail)
        parts.append(vals.t())
    return torch.cat(parts, dim=0)


@functools.lru_cache(maxsize=None)
def _int4_cpu_layout() -> tuple[int, str] | None:
    """Find the packing layout of this build's CPU int4 kernel and check its numerics.

    The layout depends on the CPU capability torch dispatches to, so it is
    probed rather than assumed. ``None`` means: do not use the kernel.
    """
    pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if pack is None or mm is None:
        return None
    try:
        gen = torch.Generator().manual_seed(0)
        # Several N so that full and partial blocks of every candidate width occur.
        probes = []
        for n in (16, 32, 48, 64, 80, 112, 144):
            q = torch.randint(0, 16, (n, 64), generator=gen, dtype=torch.int32)
            probes.append((q, pack(q, 1)))
        layout = None
        for block_n in (64, 32, 16):
            for style in ("halves", "pairs"):
                if all(
                    torch.equal(_unpack_int4_cpu(p.reshape(-1), q.shape[0], 64, block_n, style), q.to(torch.uint8))
                    for q, p in probes
                ):
                    layout = (block_n, style)
                    break
            if layout:
                break
        if layout is None:
            logger.warning("unknown CPU int4 pack layout; using int4 fallback")
            return None
        # Numerics, incl. the scales_and_zeros convention (q - 8) * s + z.
        q, packed = probes[-1]
        s = (torch.rand(2, q.shape[0], generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
        z = (torch.randn(2, q.shape[0], generator=gen) * 0.1).to(torch.bfloat16)
        sz = torch.stack([s, z], dim=-1).contiguous()
        x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
        y = mm(x, packed, 32, sz).float()
        w = (q.float() - 8) * s.float().t().repeat_interleave(32, 1) + z.float().t().repeat_interleave(32, 1)
        ref = x.float() @ w.t()
        if not torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            logger.warning("int4 weight-only kernel gave wrong results; using fallback")
            return None
        return layout
    except Exception as exc:
        logger.info("int4 weight-only kernel unavailable: %s", exc)
        return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous ``t`` whose data pointer is 64-byte aligned (views may not be)."""
    t = t.contiguous()
    if t.data_ptr() % _ALIGN:
        t = t.clone()
    return t


def _int4_params(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero for the range [mn, mx], both exactly bf16-representable.

    Rounding to bf16 (the stored dtype) happens before ``q`` is computed, so the
    stored parameters reproduce dequantize() exactly.
    """
    scale = (mx - mn) / 15.0
    # Constant group c: scale |c|/8 gives zero in {0, 2c}, both exact, and q = 0.
    absmax = torch.maximum(mn.abs(), mx.abs())
    flat = torch.where(absmax > 0, absmax / 8.0, torch.ones_like(absmax))
    scale = torch.where(scale > 0, scale, flat).to(torch.bfloat16).float()
    zero = (mn + 8.0 * scale).to(torch.bfloat16).float()
    return scale, zero


# --------------------------------------------------------------------------- modules


class WeightOnlyLinear(nn.Module):
    """Base class: shape handling, bias, and bookkeeping for weight-only layers."""

    # Non-bf16 activations: False -> cast to bf16 around the fast kernel,
    # True -> compute in fp32 (exact w.r.t. the dequantized weight, slower).
    fp32_exact: bool = False
    method: str = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] == 0:
            y = x2d.new_zeros(0, self.out_features)
        else:
            y = self._matmul(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """Effective weight [out, in] in fp32."""
        raise NotImplementedError

    def _fallback(self, x2d: torch.Tensor) -> torch.Tensor:
        # fp32 math so the result matches dequantize() regardless of x dtype.
        return F.linear(x2d.float(), self.dequantize().to(x2d.device)).to(x2d.dtype)

    def quantized_nbytes(self) -> int:
        """Bytes held by the module's buffers (quantized weight, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class WeightOnlyInt8Linear(WeightOnlyLinear):
    """Symmetric per-output-channel int8 weights, ``w ~= q * scale``."""

    method = "wint8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        with torch.no_grad():
            w = weight.detach().float()
            amax = w.abs().amax(dim=1)
            # bf16 scales: the kernel wants scales in the activation dtype;
            # q is computed against the rounded scale so dequantize() is exact.
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.bfloat16)
            q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale)
        # The vectorized bf16 kernel has no K tail handling (garbage or a
        # segfault for K % 8 != 0 on AVX2, K % 16 on AVX-512).
        self.use_kernel = weight.device.type == "cpu" and in_f % 16 == 0 and _int8_kernel_ok()
        logger.debug("wint8 %dx%d kernel=%s", out_f, in_f, self.use_kernel)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        dt = x2d.dtype
        small = x2d.shape[0] < _INT8_GEMM_MIN_ROWS
        if self.use_kernel and small and x2d.device.type == "cpu" and (dt == torch.bfloat16 or not self.fp32_exact):
            w = self.weight_int8
            if w.data_ptr() % _ALIGN:  # e.g. a buffer swapped in by load_state_dict(assign=True)
                w = self.weight_int8 = w.contiguous().clone()
            xb = _aligned(x2d.to(torch.bfloat16))
            y = torch.ops.aten._weight_int8pack_mm(xb, w, self.scales.to(torch.bfloat16))
            return y.to(dt)
        return self._fallback(x2d)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, wint8, kernel={self.use_kernel}"


class WeightOnlyInt4Linear(WeightOnlyLinear):
    """Group-wise asymmetric 4-bit weights, ``w ~= (q - 8) * scale + zero``.

    Buffers: ``weight_int4`` (uint8, two nibbles per byte) and
    ``scales_and_zeros`` (bf16, [in/group, out, 2]). With ``layout ==
    "cpu_kernel"`` the nibbles are in torch's CPU-specific kernel order,
    otherwise (``"plain"``) byte ``j`` of row ``n`` holds ``q[n, 2j]`` in the
    low nibble and ``q[n, 2j+1]`` in the high one.
    """

    method = "wint4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        kernel_groups = [g for g in _INT4_KERNEL_GROUPS if g <= group_size and in_f % g == 0]
        cpu_layout = _int4_cpu_layout() if weight.device.type == "cpu" else None
        if kernel_groups and out_f % 16 == 0 and cpu_layout is not None:
            self.layout, self.group_size = "cpu_kernel", kernel_groups[0]
        else:
            self.layout = "plain"
            # Largest group dividing in_features, else one group per row.
            groups = [g for g in (group_size, *_INT4_FALLBACK_GROUPS) if g <= group_size and in_f % g == 0]
            self.group_size = groups[0] if groups else in_f
        self._cpu_layout = cpu_layout
        if self.group_size != group_size:
            logger.debug("wint4 %dx%d: group_size %d -> %d", out_f, in_f, group_size, self.group_size)
        logger.debug("wint4 %dx%d layout=%s group=%d", out_f, in_f, self.layout, self.group_size)

        with torch.no_grad():
            q, sz = self._quantize(weight.detach(), self.group_size)
            if self.layout == "cpu_kernel":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            else:
                if in_f % 2:  # pad one zero nibble so rows pack into whole bytes
                    q = F.pad(q, (0, 1))
                packed = q[:, 0::2] | (q[:, 1::2] << 4)
        self.register_buffer("weight_int4", packed.contiguous())
        self.register_buffer("scales_and_zeros", sz)

    @staticmethod
    def _quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``q`` (uint8 [N, K] in 0..15) and bf16 scales_and_zeros [K/group, N, 2].

        Per group, the [min, max] range is shrunk by each of ``_INT4_CLIP_RATIOS``
        and the one with the lowest squared error kept (AWQ-style clip search:
        ~4% lower weight error on gaussian weights, more on heavy tails).
        Small row chunks and in-place ops keep the temporaries cache-resident;
        fresh large allocations made this ~20x slower.
        """
        n, k = w.shape
        q_out = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        sz = torch.empty(n, k // group, 2, dtype=torch.float32, device=w.device)
        chunk = max(1, _QUANT_CHUNK_ELEMS // k)
        for r0 in range(0, n, chunk):
            g = w[r0 : r0 + chunk].float().reshape(-1, k // group, group)
            mn0, mx0 = g.amin(dim=-1), g.amax(dim=-1)
            diff, d = torch.empty_like(g), torch.empty_like(g)
            best = None
            for ratio in _INT4_CLIP_RATIOS:
                scale, zero = _int4_params(mn0 * ratio, mx0 * ratio)
                # err = (q - 8) * scale - (g - zero), q = clamp(round((g - zero) / scale + 8))
                torch.sub(g, zero[..., None], out=diff)
                torch.mul(diff, scale.reciprocal()[..., None], out=d)
                d.add_(8.0).round_().clamp_(0, 15).sub_(8.0).mul_(scale[..., None]).sub_(diff)
                err = d.square_().sum(-1)
                if best is None:
                    best = (scale, zero, err)
                    continue
                better = err < best[2]
                best = (
                    torch.where(better, scale, best[0]),
                    torch.where(better, zero, best[1]),
                    torch.minimum(err, best[2]),
                )
            assert best is not None
            scale, zero = best[0], best[1]
            # Recompute q once for the winning parameters (cheaper than tracking it).
            torch.sub(g, zero[..., None], out=d)
            d.mul_(scale.reciprocal()[..., None]).add_(8.0).round_().clamp_(0, 15)
            q_out[r0 : r0 + chunk] = d.reshape(-1, k).to(torch.uint8)
            sz[r0 : r0 + chunk, :, 0] = scale
            sz[r0 : r0 + chunk, :, 1] = zero
        return q_out, sz.transpose(0, 1).to(torch.bfloat16).contiguous()

    def _unpack_q(self) -> torch.Tensor:
        """uint8 [N, K] nibble values 0..15."""
        n, k = self.out_features, self.in_features
        p = self.weight_int4
        if self.layout == "cpu_kernel":
            layout = self._cpu_layout or _int4_cpu_layout()
            assert layout is not None, "cpu_kernel layout built without a working kernel"
            return _unpack_int4_cpu(p.reshape(-1), n, k, *layout)
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(n, -1)[:, :k]

    def dequantize(self) -> torch.Tensor:
        sz = self.scales_and_zeros.float()
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return (self._unpack_q().float() - 8.0) * scale + zero

    def _gemv_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The pdserve kernel's nibble tiles and group constants, built once from the buffers
        (the same q, scale and zero: the same dequantized weight)."""
        cached = self.__dict__.get("_int4_tiles")
        if cached is None or cached[0] is not self.weight_int4:
            from engine.kernels.packing import pack_int4

            packed = None
            if self.in_features % 8 == 0 and self.group_size % 8 == 0:
                sz = self.scales_and_zeros.float()
                packed = pack_int4(self._unpack_q(), sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous())
            cached = (self.weight_int4, packed)
            self.__dict__["_int4_tiles"] = cached
        return cached[1]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        dt = x2d.dtype
        if x2d.device.type == "cpu" and x2d.shape[0] <= int4_gemv_max_rows() and dt in (torch.float32, torch.bfloat16):
            ops = cpu_ops()
            tiles = None if ops is None else self._gemv_layout()
            if tiles is not None:
                # float32 sums over the exact dequantized weight, for bf16 and float32 inputs alike
                return ops.linear_int4(x2d, *tiles, self.out_features, self.group_size, None)
        if self.layout == "cpu_kernel" and x2d.device.type == "cpu":
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            if dt == torch.bfloat16 or not self.fp32_exact:
                xb = x2d.to(torch.bfloat16).contiguous()
                return mm(xb, self.weight_int4, self.group_size, self.scales_and_zeros.to(torch.bfloat16)).to(dt)
            # fp32 scalar kernel: slow but exact w.r.t. dequantize().
            return mm(x2d.float().contiguous(), self.weight_int4, self.group_size, self.scales_and_zeros.float()).to(dt)
        return self._fallback(x2d)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, wint4, "
            f"group_size={self.group_size}, layout={self.layout}"
        )


# --------------------------------------------------------------------------- API


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    method: str,
    *,
    group_size: int = 128,
) -> nn.Module:
    """Quantize a linear layer's ``weight`` [out, in] (and keep ``bias``).

    ``group_size`` applies to wint4 only (wint8 is per output channel); if it
    does not divide in_features a smaller group that does is used, down to one
    group per row. Returns a module computing ``~F.linear(x, weight, bias)``
    in ``x.dtype``.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; supported: {', '.join(QUANT_METHODS)}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(weight.shape)} dtype {weight.dtype}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if method == "wint8":
        return WeightOnlyInt8Linear(weight, bias)
    return WeightOnlyInt4Linear(weight, bias, group_size)


def dequantize(module: nn.Module) -> torch.Tensor:
    """Effective fp32 weight [out, in] of a module made by :func:`quantize_linear`."""
    if not isinstance(module, WeightOnlyLinear):
        raise TypeError(f"not a weight-only quantized layer: {type(module).__name__}")
    return module.dequantize()
