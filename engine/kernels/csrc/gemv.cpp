// Small-batch linear layers for decode: y[b, n] = x[b, :] . w[n, :] + bias[n] over bf16 weights
// in the packed layout (engine/kernels/packing.py), streaming each weight byte from memory once
// per call whatever the batch. Odd K, float32 and many rows stay with torch.
#include "common.h"

namespace pdk {

// PDSERVE_KERNEL_ISA=avx2 (or avx512_bf16) selects the lower tier's paths on a host that has
// more, so that they are tested (and can be compared) there; nothing selects more than the CPU has.
static Isa detect_isa() {
  __builtin_cpu_init();
  const bool bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512bf16");
  const char* cap = std::getenv("PDSERVE_KERNEL_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return Isa::kAvx2;
  if (!bf16) return Isa::kAvx2;
  if (cap != nullptr && std::strcmp(cap, "avx512_bf16") == 0) return Isa::kAvx512Bf16;
  return amx_usable() ? Isa::kAmx : Isa::kAvx512Bf16;
}

const Isa kIsa = detect_isa();

namespace {

// Bf16 elements ahead of the current load to prefetch in each tile's stream (1 KB): the tiles
// are long sequential streams, but one tile ends and the next starts every K * 32 bytes.
constexpr int64_t kPrefetchAhead = 16 * 32;

// ---------------------------------------------------------------- packed GEMV
// Weights prepacked (engine/kernels/packing.py) as [N/16][K/2][16][2] bf16: tile t, pair p holds
// w[16t + i][2p + j] at [t][p][i][j]. One 64-byte load is 16 output rows x 2 k, which a BF16
// dot product (or two shifts and FMAs on AVX2) adds into 16 row accumulators at once: no
// horizontal sums, and each tile is one sequential stream of K * 32 bytes.

template <int NB>
PDS_AVX512BF16 void packed_tiles_avx512bf16(const PackedArgs& a, int64_t t0, int64_t t1, int64_t b0) {
  const int64_t KP = a.K / 2;
  for (int64_t t = t0; t < t1; t += 2) {
    const int nt = t + 1 < t1 ? 2 : 1;
    const bf16* w0 = a.w + t * KP * 32;
    const bf16* w1 = w0 + (nt == 2 ? KP * 32 : 0);
    __m512 acc[2][NB];
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
    const int32_t* xr[NB];
    for (int c = 0; c < NB; ++c) xr[c] = reinterpret_cast<const int32_t*>(a.x + (b0 + c) * a.ldx);
    for (int64_t p = 0; p < KP; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + p * 32 + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + p * 32 + kPrefetchAhead), _MM_HINT_T0);
      const __m512i v0 = _mm512_loadu_si512(w0 + p * 32);
      const __m512i v1 = _mm512_loadu_si512(w1 + p * 32);
      for (int c = 0; c < NB; ++c) {
        const __m512i xb = _mm512_set1_epi32(xr[c][p]);
        acc[0][c] = _mm512_dpbf16_ps(acc[0][c], (__m512bh)v0, (__m512bh)xb);
        acc[1][c] = _mm512_dpbf16_ps(acc[1][c], (__m512bh)v1, (__m512bh)xb);
      }
    }
    for (int r = 0; r < nt; ++r) {
      const int64_t n0 = (t + r) * 16;
      const int64_t valid = std::min<int64_t>(16, a.N - n0);
      const __mmask16 m = __mmask16((1u << valid) - 1u);
      __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n0) : _mm512_setzero_ps();
      for (int c = 0; c < NB; ++c) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, _mm512_add_ps(acc[r][c], bias));
        bf16* yr = a.y + (b0 + c) * a.ldy + n0;
        for (int64_t i = 0; i < valid; ++i) yr[i] = f2bf(tmp[i]);
      }
    }
  }
}

// One tile (16 outputs) for NB <= 4 rows of x, into out[NB][16] float32. The accumulators are
// named variables, not an array: GCC 12 kept a `__m256 acc[2][NB]` array in registers *and*
// stored it to the stack on every k step, which halved the rate once the batch made this loop
// compute-bound. AVX2 reads x as float32 (`x`, rows `ldx` apart, converted once per call): a
// broadcast from memory is then one load, where a bf16 would need a load, shift and broadcast.
#define PDK_AVX2_ROW(c)                                                  \
  if (NB > c) {                                                          \
    const __m256 xe = _mm256_broadcast_ss(x + c * ldx + 2 * p);          \
    const __m256 xo = _mm256_broadcast_ss(x + c * ldx + 2 * p + 1);      \
    lo##c = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, lo##c));     \
    hi##c = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, hi##c));     \
  }
#define PDK_AVX2_OUT(c)                                                  \
  if (NB > c) {                                                          \
    _mm256_storeu_ps(out + c * 16, lo##c);                               \
    _mm256_storeu_ps(out + c * 16 + 8, hi##c);                           \
  }

template <int NB>
__attribute__((noinline)) void tile_avx2(const bf16* __restrict w, int64_t KP, const float* __restrict x, int64_t ldx,
                                         float* __restrict out) {
  static_assert(NB >= 1 && NB <= 4, "tile_avx2: 1..4 rows");
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0;
  __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
  for (int64_t p = 0; p < KP; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(w + p * 32 + kPrefetchAhead), _MM_HINT_T0);
    const __m256i wl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 32));
    const __m256i wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 32 + 16));
    // Lane i holds (w[i][2p], w[i][2p+1]) as (low, high) halves: each half is a bf16's float.
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(wl, 16));
    const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(wl, hi_mask));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(wh, 16));
    const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(wh, hi_mask));
    PDK_AVX2_ROW(0) PDK_AVX2_ROW(1) PDK_AVX2_ROW(2) PDK_AVX2_ROW(3)
  }
  PDK_AVX2_OUT(0) PDK_AVX2_OUT(1) PDK_AVX2_OUT(2) PDK_AVX2_OUT(3)
}
#undef PDK_AVX2_ROW
#undef PDK_AVX2_OUT

template <int NB>
void packed_tiles_avx2(const PackedArgs& a, const float* xf, int64_t t0, int64_t t1, int64_t b0) {
  const int64_t KP = a.K / 2;
  float out[4 * 16];
  for (int64_t t = t0; t < t1; ++t) {
    tile_avx2<NB>(a.w + t * KP * 32, KP, xf + b0 * a.K, a.K, out);
    const int64_t n0 = t * 16;
    const int64_t valid = std::min<int64_t>(16, a.N - n0);
    if (valid == 16) {  // vector bias add and rounding: the scalar loop cost ~1.5 ns a value
      const __m256 bl = a.bias ? _mm256_loadu_ps(a.bias + n0) : _mm256_setzero_ps();
      const __m256 bh = a.bias ? _mm256_loadu_ps(a.bias + n0 + 8) : _mm256_setzero_ps();
      for (int c = 0; c < NB; ++c) {
        bf16* yr = a.y + (b0 + c) * a.ldy + n0;
        store8(yr, _mm256_add_ps(_mm256_loadu_ps(out + c * 16), bl));
        store8(yr + 8, _mm256_add_ps(_mm256_loadu_ps(out + c * 16 + 8), bh));
      }
      continue;
    }
    for (int c = 0; c < NB; ++c) {
      bf16* yr = a.y + (b0 + c) * a.ldy + n0;
      for (int64_t i = 0; i < valid; ++i) yr[i] = f2bf(out[c * 16 + i] + (a.bias ? a.bias[n0 + i] : 0.f));
    }
  }
}

// Tiles outermost, row blocks inside: a tile (K * 32 bytes, at most ~100 KB) comes from memory
// once and serves every block of rows from cache, so more rows cost compute, not bandwidth.
void packed_range(const PackedArgs& a, const float* xf, int64_t t0, int64_t t1) {
  if (kIsa == Isa::kAmx && a.K % 32 == 0) {
    amx_packed_range(a, t0, t1, false);
  } else if (has_avx512bf16()) {
    for (int64_t t = t0; t < t1; t += 2) {
      const int64_t te = std::min<int64_t>(t + 2, t1);
      int64_t b = 0;
      for (; b + 8 <= a.B; b += 8) packed_tiles_avx512bf16<8>(a, t, te, b);
      switch (a.B - b) {
        case 7: packed_tiles_avx512bf16<7>(a, t, te, b); break;
        case 6: packed_tiles_avx512bf16<6>(a, t, te, b); break;
        case 5: packed_tiles_avx512bf16<5>(a, t, te, b); break;
        case 4: packed_tiles_avx512bf16<4>(a, t, te, b); break;
        case 3: packed_tiles_avx512bf16<3>(a, t, te, b); break;
        case 2: packed_tiles_avx512bf16<2>(a, t, te, b); break;
        case 1: packed_tiles_avx512bf16<1>(a, t, te, b); break;
        default: break;
      }
    }
  } else {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b = 0;
      for (; b + 4 <= a.B; b += 4) packed_tiles_avx2<4>(a, xf, t, t + 1, b);
      switch (a.B - b) {
        case 3: packed_tiles_avx2<3>(a, xf, t, t + 1, b); break;
        case 2: packed_tiles_avx2<2>(a, xf, t, t + 1, b); break;
        case 1: packed_tiles_avx2<1>(a, xf, t, t + 1, b); break;
        default: break;
      }
    }
  }
}


}  // namespace

// ---------------------------------------------------------------- exported ops

// x [B, K] bf16 (rows may be strided), w packed [ceil(N/16), K/2, 16, 2] bf16; bias [N] or
// absent. Returns [B, N] bf16, accumulated in float32.
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                            const c10::optional<torch::Tensor>& bias) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_packed: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "linear_packed: x must be [B, K] with contiguous rows");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 16 && w.size(3) == 2 && w.is_contiguous(), "linear_packed: w must be packed [N/16, K/2, 16, 2]");
  const int64_t K = x.size(1), B = x.size(0);
  TORCH_CHECK(K % 2 == 0 && w.size(1) * 2 == K && w.size(0) == (n + 15) / 16, "linear_packed: shapes ", x.sizes(), " and ", w.sizes(), " for N=", n);
  TORCH_CHECK(x.stride(0) % 2 == 0 && (reinterpret_cast<uintptr_t>(x.data_ptr()) % 4) == 0, "linear_packed: x rows must be 4-byte aligned");
  torch::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == n, "linear_packed: bias size");
  }
  auto y = torch::empty({B, n}, x.options());
  if (B == 0 || n == 0) return y;
  PackedArgs a{reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), B, reinterpret_cast<const bf16*>(w.data_ptr()),
               K, n, b32.defined() ? b32.data_ptr<float>() : nullptr, reinterpret_cast<bf16*>(y.data_ptr()), n};
  // AVX2 reads x as float32 [B, K] (small next to the weights), converted here into a reused
  // buffer: a tensor per call cost ~8 us of allocation and dispatch, 4 calls a layer, every step.
  thread_local std::vector<float> xf;
  const float* xfp = nullptr;
  if (!has_avx512bf16()) {
    xf.resize(size_t(B * K));
    for (int64_t b = 0; b < B; ++b) {
      const bf16* xr = a.x + b * a.ldx;
      for (int64_t k = 0; k < K; ++k) xf[size_t(b * K + k)] = bf2f(xr[k]);
    }
    xfp = xf.data();
  }
  const int64_t tiles = w.size(0);
  const int64_t grain = std::max<int64_t>(2, 32768 / std::max<int64_t>(K * 32, 1) * 2);
  at::parallel_for(0, (tiles + 1) / 2, std::max<int64_t>(1, grain / 2), [&](int64_t p0, int64_t p1) {
    packed_range(a, xfp, p0 * 2, std::min(tiles, p1 * 2));
  });
  return y;
}

// x [B, K] bf16, w the gate_up weight packed with its halves interleaved by tile (pack_bf16(...,
// interleave=True): gate tile j, then up tile j); returns silu(x . gate) * (x . up) [B, I] in
// bf16 without rounding the projections in between. AMX only (kernel ISA amx_bf16).
torch::Tensor linear_packed_silu(const torch::Tensor& x, const torch::Tensor& w, int64_t intermediate) {
  check_cpu(x, "x");
  TORCH_CHECK(kIsa == Isa::kAmx, "linear_packed_silu: needs AMX (kernel ISA ", isa_name(), ")");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_packed_silu: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "linear_packed_silu: x must be [B, K] with contiguous rows");
  const int64_t K = x.size(1), B = x.size(0), I = intermediate;
  TORCH_CHECK(I % 16 == 0 && K % 32 == 0 && w.dim() == 4 && w.is_contiguous() && w.size(0) == I / 8 &&
                  w.size(1) * 2 == K && w.size(2) == 16 && w.size(3) == 2,
              "linear_packed_silu: shapes ", x.sizes(), " and ", w.sizes(), " for I=", I);
  auto y = torch::empty({B, I}, x.options());
  if (B == 0 || I == 0) return y;
  PackedArgs a{reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), B, reinterpret_cast<const bf16*>(w.data_ptr()),
               K, 2 * I, nullptr, reinterpret_cast<bf16*>(y.data_ptr()), I};
  const int64_t pairs = I / 16;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K * 32, 1));
  at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) { amx_packed_range(a, p0 * 2, p1 * 2, true); });
  return y;
}

// x [T, H] float32, updated in place to x + delta when delta is given; returns
// rms_norm(x) * weight rounded once to bfloat16 (out_bf16) or float32.

std::string isa_name() {
  switch (kIsa) {
    case Isa::kAmx: return "amx_bf16";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    default: return "avx2";
  }
}

}  // namespace pdk
