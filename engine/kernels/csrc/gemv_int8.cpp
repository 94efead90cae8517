// Small-batch linear over group-wise symmetric int8 weights (w = q * scale, q in -127..127, one
// scale per row and group of k; GGUF's Q8_0 with group 32). The quantized LM head of wint4 /
// wint8 models runs here: on the default model its 56 MB bf16 table becomes 28 MB of int8.
//
// The activations are rounded once per call to int16 with one scale per row (|x| <= 32767 * s:
// a relative error of 2^-16 of the row's largest value, far below bf16's own 2^-9), so the inner
// loop is integer multiply-adds: one sign-extension turns 16 rows x 2 k of int8 into int16 pairs
// and one pmaddwd multiplies them by a broadcast activation pair. Sums stay exact in int32 for a
// group (at most 2 * 127 * 32767 * group/2 < 2^31 for group <= 256); each group's sum is scaled
// in float32. Layout (engine/kernels/packing.py pack_int8): per tile of 16 rows and pair of k,
// 16 x 2 bytes ([N/16][K/2][16][2] int8, as the bf16 packed GEMV lays out its pairs); scales
// [N/16][K/group][16] float32.
#include "common.h"

namespace pdk {

namespace {

struct Int8Args {
  const int32_t* xq;  // [B, K/2] int16 pairs of the quantized activations
  const float* xs;    // [B] activation scales
  int64_t B, K, N, group;
  const int8_t* w;    // [T][K/2][16][2]
  const float* sc;    // [T][G][16]
  const float* bias;  // [N] or null
  float* y;           // [B, N] float32 output, or null
  bf16* yb;           // [B, N] bf16 output (when y is null)
};

template <int NB>
PDS_AVX512BF16 void int8_tile_avx512(const Int8Args& a, int64_t t, int64_t b0) {
  const int64_t P = a.K / 2, G = a.K / a.group, PG = a.group / 2;
  const int8_t* w = a.w + t * P * 32;
  __m512 y[NB];
  for (int c = 0; c < NB; ++c) y[c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[NB][2];  // two chains per row: pmaddwd + add latency
    for (int c = 0; c < NB; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_si512();
    for (int64_t p = g * PG; p < (g + 1) * PG; p += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + p * 32) + 2048, _MM_HINT_T0);
      for (int j = 0; j < 2; ++j) {
        const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p + j) * 32)));
        for (int c = 0; c < NB; ++c) {
          const __m512i xp = _mm512_set1_epi32(a.xq[(b0 + c) * P + p + j]);
          acc[c][j] = _mm512_add_epi32(acc[c][j], _mm512_madd_epi16(v, xp));
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(a.sc + (t * G + g) * 16);
    for (int c = 0; c < NB; ++c)
      y[c] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_add_epi32(acc[c][0], acc[c][1])), y[c]);
  }
  const int64_t n0 = t * 16;
  const int64_t valid = std::min<int64_t>(16, a.N - n0);
  const __mmask16 m = __mmask16((1u << valid) - 1u);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n0) : _mm512_setzero_ps();
  for (int c = 0; c < NB; ++c) {
    const __m512 out = _mm512_fmadd_ps(y[c], _mm512_set1_ps(a.xs[b0 + c]), bias);
    if (a.y != nullptr)
      _mm512_mask_storeu_ps(a.y + (b0 + c) * a.N + n0, m, out);
    else
      _mm256_mask_storeu_epi16(a.yb + (b0 + c) * a.N + n0, m, (__m256i)_mm512_cvtneps_pbh(out));
  }
}

// AVX2: the same in two halves of 8 rows.
template <int NB>
void int8_tile_avx2(const Int8Args& a, int64_t t, int64_t b0) {
  const int64_t P = a.K / 2, G = a.K / a.group, PG = a.group / 2;
  const int8_t* w = a.w + t * P * 32;
  __m256 y[2][NB];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < NB; ++c) y[h][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[2][NB];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < NB; ++c) acc[h][c] = _mm256_setzero_si256();
    for (int64_t p = g * PG; p < (g + 1) * PG; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(w + p * 32) + 2048, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 of the tile
        const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p * 32 + 16 * h)));
        for (int c = 0; c < NB; ++c)
          acc[h][c] = _mm256_add_epi32(acc[h][c], _mm256_madd_epi16(v, _mm256_set1_epi32(a.xq[(b0 + c) * P + p])));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(a.sc + (t * G + g) * 16 + 8 * h);
      for (int c = 0; c < NB; ++c) y[h][c] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[h][c]), y[h][c]);
    }
  }
  const int64_t n0 = t * 16;
  const int64_t valid = std::min<int64_t>(16, a.N - n0);
  for (int c = 0; c < NB; ++c) {
    alignas(32) float tmp[16];
    _mm256_store_ps(tmp, y[0][c]);
    _mm256_store_ps(tmp + 8, y[1][c]);
    for (int64_t i = 0; i < valid; ++i) {
      const float v = tmp[i] * a.xs[b0 + c] + (a.bias ? a.bias[n0 + i] : 0.f);
      if (a.y != nullptr)
        a.y[(b0 + c) * a.N + n0 + i] = v;
      else
        a.yb[(b0 + c) * a.N + n0 + i] = f2bf(v);
    }
  }
}

// Tiles outermost (a tile's bytes read once for all rows), rows in blocks of 4.
void int8_range(const Int8Args& a, int64_t t0, int64_t t1) {
  const bool wide = has_avx512bf16();
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.B; b += 4) wide ? int8_tile_avx512<4>(a, t, b) : int8_tile_avx2<4>(a, t, b);
    switch (a.B - b) {
      case 3: wide ? int8_tile_avx512<3>(a, t, b) : int8_tile_avx2<3>(a, t, b); break;
      case 2: wide ? int8_tile_avx512<2>(a, t, b) : int8_tile_avx2<2>(a, t, b); break;
      case 1: wide ? int8_tile_avx512<1>(a, t, b) : int8_tile_avx2<1>(a, t, b); break;
      default: break;
    }
  }
}

}  // namespace

// x [B, K] float32 or bf16; w [ceil(N/16), K/2, 32] int8 (pack_int8); scales [ceil(N/16), K/group,
// 16] float32; bias [N] or absent. Returns [B, N] in x's dtype.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales, int64_t n,
                          int64_t group, const c10::optional<torch::Tensor>& bias) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "linear_int8: x must be [B, K]");
  const int64_t K = x.size(1), B = x.size(0), T = (n + 15) / 16;
  TORCH_CHECK(group >= 4 && group <= 256 && group % 4 == 0 && K % group == 0, "linear_int8: group ", group,
              " must be a multiple of 4 up to 256 dividing K=", K);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 3 && w.size(0) == T &&
                  w.size(1) * 2 == K && w.size(2) == 32,
              "linear_int8: shapes ", x.sizes(), " and ", w.sizes(), " for N=", n);
  const int64_t G = K / group;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == T && scales.size(1) == G && scales.size(2) == 16,
              "linear_int8: scales must be float32 [", T, ", ", G, ", 16]");
  torch::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == n, "linear_int8: bias size");
  }
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  auto xc = x.contiguous();
  // Plain loops, not torch ops: at decode sizes each op's dispatch would cost more than the math.
  std::vector<int16_t> xq(static_cast<size_t>(B * K));
  std::vector<float> xs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    auto at_k = [&](int64_t k) {
      return is_bf16 ? bf2f(reinterpret_cast<const bf16*>(xc.data_ptr())[b * K + k]) : xc.data_ptr<float>()[b * K + k];
    };
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::fabs(at_k(k));
      finite &= std::isfinite(v);
      amax = std::max(amax, v);
    }
    // A row with inf or NaN has no int16 scale: it is quantized as zeros and its outputs are NaN.
    const float s = finite && amax > 0.f ? amax / 32767.f : 0.f;
    const float inv = s > 0.f ? 1.f / s : 0.f;
    for (int64_t k = 0; k < K; ++k)
      xq[size_t(b * K + k)] = s > 0.f ? int16_t(std::lrintf(std::clamp(at_k(k) * inv, -32767.f, 32767.f))) : int16_t(0);
    xs[size_t(b)] = finite ? s : NAN;
  }
  auto y = torch::empty({B, n}, x.options());
  if (B > 0 && n > 0) {
    Int8Args a{reinterpret_cast<const int32_t*>(xq.data()), xs.data(), B, K, n, group, w.data_ptr<int8_t>(),
               scales.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr,
               is_bf16 ? nullptr : y.data_ptr<float>(), is_bf16 ? reinterpret_cast<bf16*>(y.data_ptr()) : nullptr};
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * 16, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) { int8_range(a, t0, t1); });
  }
  return y;
}

}  // namespace pdk
