// Small-batch linear over group-wise 4-bit weights (wint4: w = (q - 8) * scale + zero), streaming
// the nibbles once per call. Per (row, group) the sum is split as
//   sum_k w_k x_k = scale * sum_k q_k x_k + (zero - 8 * scale) * sum_k x_k,
// so the inner loop only turns nibbles into numbers and multiplies; the group's two constants and
// the activation's group sums come once per group. Layout (engine/kernels/packing.py pack_int4):
// per tile of 16 rows and quad of 4 k-pairs, one 32-bit word per row holding the 4 even-k nibbles
// in bits 0-15 and the 4 odd-k nibbles in bits 16-31 ([N/16][K/8][16] words); scales and zero
// terms [N/16][K/group][16] float32. Pair j of a quad is then (word >> 4j) & 0x000f000f: with
// bf16 activations, OR-ing in 0x4300 makes each half the bf16 of 128 + q (exact), so one BF16
// dot product takes two k at once; the 128 * sum x it adds is taken back with the zero term.
#include "common.h"

namespace pdk {

namespace {

struct Int4Args {
  const float* x;     // [B, K] float32
  const bf16* xb;     // [B, K] bf16 (the dot-product path), or null
  const float* xsum;  // [B, G] per-group sums of x
  int64_t B, K, N, group;
  const uint32_t* w;  // [T][K/8][16]
  const float* sc;    // [T][G][16]
  const float* zb;    // [T][G][16]
  const float* bias;  // [N] or null
  float* y;           // [B, N] float32 output, or null
  bf16* yb;           // [B, N] bf16 output (when y is null)
};

// bf16 activations on AVX-512 BF16: two k per dot product, on 128 + q.
template <int NB>
PDS_AVX512BF16 void int4_tile_bf16dp(const Int4Args& a, int64_t t, int64_t b0) {
  const int64_t KQ = a.K / 8, G = a.K / a.group, QG = a.group / 8;
  const uint32_t* w = a.w + t * KQ * 16;
  const __m512i mask = _mm512_set1_epi32(0x000f000f), magic = _mm512_set1_epi32(0x43004300);
  __m512 y[NB];
  for (int c = 0; c < NB; ++c) y[c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[NB][2];  // two chains per row (even and odd pairs): the dot products' latency
    for (int c = 0; c < NB; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
    for (int64_t qd = g * QG; qd < (g + 1) * QG; ++qd) {
      _mm_prefetch(reinterpret_cast<const char*>(w + qd * 16) + 2048, _MM_HINT_T0);
      const __m512i d = _mm512_loadu_si512(w + qd * 16);
      for (int j = 0; j < 4; ++j) {
        // (d >> 4j) & mask | magic: 0xEA is the ternary-logic table of (A & B) | C
        const __m512i v = _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4 * j), mask, magic, 0xEA);
        for (int c = 0; c < NB; ++c) {
          const int32_t xp = reinterpret_cast<const int32_t*>(a.xb + (b0 + c) * a.K)[qd * 4 + j];
          acc[c][j & 1] = _mm512_dpbf16_ps(acc[c][j & 1], (__m512bh)v, (__m512bh)_mm512_set1_epi32(xp));
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(a.sc + (t * G + g) * 16);
    // sum (128 + q) x = sum q x + 128 sum x: the zero term takes the 128 back.
    const __m512 z = _mm512_fmsub_ps(_mm512_set1_ps(128.0f), s, _mm512_loadu_ps(a.zb + (t * G + g) * 16));
    for (int c = 0; c < NB; ++c)
      y[c] = _mm512_fmadd_ps(s, _mm512_add_ps(acc[c][0], acc[c][1]),
                             _mm512_fnmadd_ps(z, _mm512_set1_ps(a.xsum[(b0 + c) * G + g]), y[c]));
  }
  const int64_t n0 = t * 16;
  const int64_t valid = std::min<int64_t>(16, a.N - n0);
  const __mmask16 m = __mmask16((1u << valid) - 1u);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n0) : _mm512_setzero_ps();
  for (int c = 0; c < NB; ++c) {
    const __m512 out = _mm512_add_ps(y[c], bias);
    if (a.y != nullptr)
      _mm512_mask_storeu_ps(a.y + (b0 + c) * a.N + n0, m, out);
    else
      _mm256_mask_storeu_epi16(a.yb + (b0 + c) * a.N + n0, m, (__m256i)_mm512_cvtneps_pbh(out));
  }
}

// float32 activations (and AVX2 hosts): nibbles to floats, float32 FMAs, 8 rows per vector.
template <int NB>
void int4_tile_avx2(const Int4Args& a, int64_t t, int64_t b0) {
  const int64_t KQ = a.K / 8, G = a.K / a.group, QG = a.group / 8;
  const uint32_t* w = a.w + t * KQ * 16;
  const __m256i mask = _mm256_set1_epi32(0xF);
  __m256 y[2][NB];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < NB; ++c) y[h][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[2][NB];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < NB; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t qd = g * QG; qd < (g + 1) * QG; ++qd) {
      _mm_prefetch(reinterpret_cast<const char*>(w + qd * 16) + 2048, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 of the tile
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + qd * 16 + 8 * h));
        for (int j = 0; j < 4; ++j) {
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 4 * j), mask));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 16 + 4 * j), mask));
          for (int c = 0; c < NB; ++c) {
            const float* xr = a.x + (b0 + c) * a.K + 8 * qd + 2 * j;
            acc[h][c] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(xr + 1), _mm256_fmadd_ps(lo, _mm256_broadcast_ss(xr), acc[h][c]));
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(a.sc + (t * G + g) * 16 + 8 * h);
      const __m256 z = _mm256_loadu_ps(a.zb + (t * G + g) * 16 + 8 * h);
      for (int c = 0; c < NB; ++c)
        y[h][c] = _mm256_fmadd_ps(s, acc[h][c], _mm256_fmadd_ps(z, _mm256_set1_ps(a.xsum[(b0 + c) * G + g]), y[h][c]));
    }
  }
  const int64_t n0 = t * 16;
  const int64_t valid = std::min<int64_t>(16, a.N - n0);
  for (int c = 0; c < NB; ++c) {
    alignas(32) float tmp[16];
    _mm256_store_ps(tmp, y[0][c]);
    _mm256_store_ps(tmp + 8, y[1][c]);
    for (int64_t i = 0; i < valid; ++i) {
      const float v = tmp[i] + (a.bias ? a.bias[n0 + i] : 0.f);
      if (a.y != nullptr)
        a.y[(b0 + c) * a.N + n0 + i] = v;
      else
        a.yb[(b0 + c) * a.N + n0 + i] = f2bf(v);
    }
  }
}

// Tiles outermost (a tile's nibbles read once for all rows), rows in blocks of 4.
void int4_range(const Int4Args& a, int64_t t0, int64_t t1) {
  const bool wide = a.xb != nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.B; b += 4) wide ? int4_tile_bf16dp<4>(a, t, b) : int4_tile_avx2<4>(a, t, b);
    switch (a.B - b) {
      case 3: wide ? int4_tile_bf16dp<3>(a, t, b) : int4_tile_avx2<3>(a, t, b); break;
      case 2: wide ? int4_tile_bf16dp<2>(a, t, b) : int4_tile_avx2<2>(a, t, b); break;
      case 1: wide ? int4_tile_bf16dp<1>(a, t, b) : int4_tile_avx2<1>(a, t, b); break;
      default: break;
    }
  }
}

}  // namespace

// x [B, K] float32 or bf16; w packed nibbles [ceil(N/16), K/8, 16] int32 words; scales and zero terms
// [ceil(N/16), K/group, 16] float32; bias [N] or absent. Returns [B, N] in x's dtype.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t n, int64_t group, const c10::optional<torch::Tensor>& bias) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "linear_int4: x must be [B, K]");
  const int64_t K = x.size(1), B = x.size(0), T = (n + 15) / 16;
  TORCH_CHECK(group >= 8 && group % 8 == 0 && K % group == 0, "linear_int4: group ", group,
              " must be a multiple of 8 dividing K=", K);
  TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && w.dim() == 3 && w.size(0) == T &&
                  w.size(1) * 8 == K && w.size(2) == 16,
              "linear_int4: shapes ", x.sizes(), " and ", w.sizes(), " for N=", n);
  const int64_t G = K / group;
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == T &&
                    t->size(1) == G && t->size(2) == 16,
                "linear_int4: scales/zeros must be float32 [", T, ", ", G, ", 16]");
  torch::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == n, "linear_int4: bias size");
  }
  // Plain loops, not torch ops: at decode sizes each op's dispatch would cost more than the math.
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  const bool dp = is_bf16 && has_avx512bf16();  // the dot-product path reads bf16 x as it is
  auto xc = x.contiguous();
  std::vector<float> xf(dp ? 0 : size_t(B * K)), xsum(size_t(B * G));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const float v = is_bf16 ? bf2f(reinterpret_cast<const bf16*>(xc.data_ptr())[b * K + k]) : xc.data_ptr<float>()[b * K + k];
        sum += v;
        if (!dp) xf[size_t(b * K + k)] = v;
      }
      xsum[size_t(b * G + g)] = sum;
    }
  auto y = torch::empty({B, n}, x.options());
  if (B > 0 && n > 0) {
    Int4Args a{dp ? nullptr : xf.data(), dp ? reinterpret_cast<const bf16*>(xc.data_ptr()) : nullptr, xsum.data(), B, K, n,
               group, reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()), scales.data_ptr<float>(),
               zeros.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr,
               is_bf16 ? nullptr : y.data_ptr<float>(), is_bf16 ? reinterpret_cast<bf16*>(y.data_ptr()) : nullptr};
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * 8, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) { int4_range(a, t0, t1); });
  }
  return y;
}

}  // namespace pdk
