// pdserve CPU kernels for the decode step: small-batch GEMV that streams each weight once,
// paged decode attention that reads KV blocks in place, rotary + KV-cache write, fused
// residual-add + RMSNorm and SiLU-and-mul.
//
// The base ISA is AVX2+FMA (every host of this project's kind has it; engine/kernels checks
// before loading). AVX-512 (with BF16 dot products where present) is chosen at run time for the
// GEMV, the one kernel where it pays. Threads come from ATen's pool (at::parallel_for), so these
// kernels share torch's OpenMP threads instead of starting a second pool that would spin
// against them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

inline float bf2f(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

template <typename T> inline float load1(const T* p);
template <> inline float load1<float>(const float* p) { return *p; }
template <> inline float load1<bf16>(const bf16* p) { return bf2f(*p); }
template <typename T> inline void store1(T* p, float v);
template <> inline void store1<float>(float* p, float v) { *p = v; }
template <> inline void store1<bf16>(bf16* p, float v) { *p = f2bf(v); }

// ---------------------------------------------------------------- AVX2 helpers
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  // Round to nearest even in integer arithmetic (no AVX-512 BF16 needed); NaNs do not occur here.
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  u = _mm256_srli_epi32(u, 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for float lanes: Cody-Waite range reduction and a degree-6 polynomial (about 2 ulp);
// inputs below -87 give 0, as expf underflows there anyway.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, out);
}

inline float exp1(float x) {
  alignas(32) float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(buf, exp8(_mm256_load_ps(buf)));
  return buf[0];
}

// ---------------------------------------------------------------- GEMV: y[b, n] = x[b, :] . w[n, :] + bias[n]
// Rows of w are taken 4 at a time and every batch row is multiplied against them while they
// sit in L1, so each weight byte comes from memory once per call whatever the batch.
struct GemvArgs {
  const void* x;
  int64_t ldx;
  int64_t B;
  const void* w;
  int64_t K;
  const float* bias;
  void* y;
  int64_t ldy;
};

template <typename T, int NB>
void gemv_avx2_tile(const GemvArgs& a, int64_t n, int64_t b0) {
  const T* w = static_cast<const T*>(a.w);
  const T* x = static_cast<const T*>(a.x);
  const int64_t K = a.K, kv = K / 8 * 8;
  const T* wr[4];
  for (int r = 0; r < 4; ++r) wr[r] = w + (n + r) * K;
  const T* xr[NB];
  for (int c = 0; c < NB; ++c) xr[c] = x + (b0 + c) * a.ldx;
  __m256 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kv; k += 8) {
    __m256 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = load8(wr[r] + k);
    for (int c = 0; c < NB; ++c) {
      __m256 xv = load8(xr[c] + k);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  T* y = static_cast<T*>(a.y);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) {
      float s = hsum8(acc[r][c]);
      for (int64_t k = kv; k < K; ++k) s += load1(wr[r] + k) * load1(xr[c] + k);
      if (a.bias) s += a.bias[n + r];
      store1(y + (b0 + c) * a.ldy + n + r, s);
    }
}

#ifndef PF_ROWS
#define PF_ROWS 16
#endif
#define PDS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define PDS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int NB>
PDS_AVX512BF16 void gemv_bf16_avx512bf16_tile(const GemvArgs& a, int64_t n, int64_t b0) {
  const bf16* w = static_cast<const bf16*>(a.w);
  const bf16* x = static_cast<const bf16*>(a.x);
  const int64_t K = a.K, kv = K / 32 * 32;
  const int rem = int(K - kv);
  const __mmask32 tail = rem ? __mmask32((1u << rem) - 1u) : 0;
  const bf16* wr[4];
  for (int r = 0; r < 4; ++r) wr[r] = w + (n + r) * K;
  const bf16* xr[NB];
  for (int c = 0; c < NB; ++c) xr[c] = x + (b0 + c) * a.ldx;
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 32) {
    __m512i wv[4];
    // The next tile's rows, one tile ahead: rows are short streams (K * 2 bytes) that the
    // hardware prefetchers pick up too late on their own.
    if (NB == 1 || b0 == 0)
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + PF_ROWS * K), _MM_HINT_T0);
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_si512(wr[r] + k);
    for (int c = 0; c < NB; ++c) {
      __m512i xv = _mm512_loadu_si512(xr[c] + k);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (rem) {
    __m512i wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_epi16(tail, wr[r] + kv);
    for (int c = 0; c < NB; ++c) {
      __m512i xv = _mm512_maskz_loadu_epi16(tail, xr[c] + kv);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  bf16* y = static_cast<bf16*>(a.y);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) {
      float s = _mm512_reduce_add_ps(acc[r][c]);
      if (a.bias) s += a.bias[n + r];
      y[(b0 + c) * a.ldy + n + r] = f2bf(s);
    }
}

template <int NB>
PDS_AVX512 void gemv_f32_avx512_tile(const GemvArgs& a, int64_t n, int64_t b0) {
  const float* w = static_cast<const float*>(a.w);
  const float* x = static_cast<const float*>(a.x);
  const int64_t K = a.K, kv = K / 16 * 16;
  const int rem = int(K - kv);
  const __mmask16 tail = rem ? __mmask16((1u << rem) - 1u) : 0;
  const float* wr[4];
  for (int r = 0; r < 4; ++r) wr[r] = w + (n + r) * K;
  const float* xr[NB];
  for (int c = 0; c < NB; ++c) xr[c] = x + (b0 + c) * a.ldx;
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 16) {
    __m512 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_ps(wr[r] + k);
    for (int c = 0; c < NB; ++c) {
      __m512 xv = _mm512_loadu_ps(xr[c] + k);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  if (rem) {
    __m512 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(tail, wr[r] + kv);
    for (int c = 0; c < NB; ++c) {
      __m512 xv = _mm512_maskz_loadu_ps(tail, xr[c] + kv);
      for (int r = 0; r < 4; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  float* y = static_cast<float*>(a.y);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NB; ++c) {
      float s = _mm512_reduce_add_ps(acc[r][c]);
      if (a.bias) s += a.bias[n + r];
      y[(b0 + c) * a.ldy + n + r] = s;
    }
}

// The scalar path for the last N % 4 rows (tiny test models have such shapes).
template <typename T>
void gemv_row_scalar(const GemvArgs& a, int64_t n) {
  const T* w = static_cast<const T*>(a.w) + n * a.K;
  for (int64_t b = 0; b < a.B; ++b) {
    const T* x = static_cast<const T*>(a.x) + b * a.ldx;
    float s = 0.f;
    for (int64_t k = 0; k < a.K; ++k) s += load1(w + k) * load1(x + k);
    if (a.bias) s += a.bias[n];
    store1(static_cast<T*>(a.y) + b * a.ldy + n, s);
  }
}

enum class Isa { kAvx2, kAvx512, kAvx512Bf16 };

Isa detect_isa() {
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  return avx512 ? Isa::kAvx512 : Isa::kAvx2;
}

const Isa kIsa = detect_isa();

template <typename Tile4, typename Tile2, typename Tile1>
void gemv_rows(const GemvArgs& a, int64_t n, int nb_max, Tile4 t4, Tile2 t2, Tile1 t1) {
  int64_t b = 0;
  for (; b + nb_max <= a.B; b += nb_max) (nb_max == 4 ? t4 : t2)(a, n, b);
  for (; b + 2 <= a.B; b += 2) t2(a, n, b);
  for (; b < a.B; ++b) t1(a, n, b);
}

void gemv_range(const GemvArgs& a, bool is_bf16, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    if (is_bf16 && kIsa == Isa::kAvx512Bf16) {
      gemv_rows(a, n, 4, gemv_bf16_avx512bf16_tile<4>, gemv_bf16_avx512bf16_tile<2>, gemv_bf16_avx512bf16_tile<1>);
    } else if (!is_bf16 && kIsa != Isa::kAvx2) {
      gemv_rows(a, n, 4, gemv_f32_avx512_tile<4>, gemv_f32_avx512_tile<2>, gemv_f32_avx512_tile<1>);
    } else if (is_bf16) {
      gemv_rows(a, n, 2, gemv_avx2_tile<bf16, 2>, gemv_avx2_tile<bf16, 2>, gemv_avx2_tile<bf16, 1>);
    } else {
      gemv_rows(a, n, 2, gemv_avx2_tile<float, 2>, gemv_avx2_tile<float, 2>, gemv_avx2_tile<float, 1>);
    }
  }
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// ---------------------------------------------------------------- packed GEMV
// Weights prepacked (engine/kernels/packing.py) as [N/16][K/2][16][2] bf16: tile t, pair p holds
// w[16t + i][2p + j] at [t][p][i][j]. One 64-byte load is 16 output rows x 2 k, which a BF16
// dot product (or two shifts and FMAs on AVX2) adds into 16 row accumulators at once: no
// horizontal sums, and each tile is one sequential stream of K * 32 bytes.
struct PackedArgs {
  const bf16* x;
  int64_t ldx;
  int64_t B;
  const bf16* w;  // packed
  int64_t K;      // even
  int64_t N;
  const float* bias;
  bf16* y;
  int64_t ldy;
};

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
      _mm_prefetch(reinterpret_cast<const char*>(w0 + p * 32 + PF_ROWS * 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + p * 32 + PF_ROWS * 32), _MM_HINT_T0);
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

template <int NB>
void packed_tiles_avx2(const PackedArgs& a, int64_t t0, int64_t t1, int64_t b0) {
  const int64_t KP = a.K / 2;
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  for (int64_t t = t0; t < t1; ++t) {
    const bf16* w = a.w + t * KP * 32;
    __m256 acc[2][NB];
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < NB; ++c) acc[r][c] = _mm256_setzero_ps();
    const bf16* xr[NB];
    for (int c = 0; c < NB; ++c) xr[c] = a.x + (b0 + c) * a.ldx;
    for (int64_t p = 0; p < KP; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(w + p * 32 + PF_ROWS * 32), _MM_HINT_T0);
      __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 32));
      __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 32 + 16));
      // Lane i holds (w[i][2p], w[i][2p+1]) as (low, high) halves: each half is a bf16's float.
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(lo, hi_mask));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(hi, hi_mask));
      for (int c = 0; c < NB; ++c) {
        const __m256 xe = _mm256_set1_ps(bf2f(xr[c][2 * p]));
        const __m256 xo = _mm256_set1_ps(bf2f(xr[c][2 * p + 1]));
        acc[0][c] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, acc[0][c]));
        acc[1][c] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, acc[1][c]));
      }
    }
    const int64_t n0 = t * 16;
    const int64_t valid = std::min<int64_t>(16, a.N - n0);
    for (int c = 0; c < NB; ++c) {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, acc[0][c]);
      _mm256_store_ps(tmp + 8, acc[1][c]);
      bf16* yr = a.y + (b0 + c) * a.ldy + n0;
      for (int64_t i = 0; i < valid; ++i) yr[i] = f2bf(tmp[i] + (a.bias ? a.bias[n0 + i] : 0.f));
    }
  }
}

void packed_range(const PackedArgs& a, int64_t t0, int64_t t1) {
  int64_t b = 0;
  if (kIsa == Isa::kAvx512Bf16) {
    for (; b + 8 <= a.B; b += 8) packed_tiles_avx512bf16<8>(a, t0, t1, b);
    switch (a.B - b) {
      case 7: packed_tiles_avx512bf16<7>(a, t0, t1, b); break;
      case 6: packed_tiles_avx512bf16<6>(a, t0, t1, b); break;
      case 5: packed_tiles_avx512bf16<5>(a, t0, t1, b); break;
      case 4: packed_tiles_avx512bf16<4>(a, t0, t1, b); break;
      case 3: packed_tiles_avx512bf16<3>(a, t0, t1, b); break;
      case 2: packed_tiles_avx512bf16<2>(a, t0, t1, b); break;
      case 1: packed_tiles_avx512bf16<1>(a, t0, t1, b); break;
      default: break;
    }
  } else {
    for (; b + 4 <= a.B; b += 4) packed_tiles_avx2<4>(a, t0, t1, b);
    switch (a.B - b) {
      case 3: packed_tiles_avx2<3>(a, t0, t1, b); break;
      case 2: packed_tiles_avx2<2>(a, t0, t1, b); break;
      case 1: packed_tiles_avx2<1>(a, t0, t1, b); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------- exported ops

// x [B, K] (rows may be strided, elements contiguous), w [N, K] contiguous, same dtype; bias [N]
// float32 or absent. Returns [B, N] in x's dtype, accumulated in float32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: shapes ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x and w dtypes differ");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "linear: x rows and w must be contiguous");
  torch::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == w.size(0), "linear: bias size");
  }
  const int64_t B = x.size(0), N = w.size(0), K = w.size(1);
  auto y = torch::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  GemvArgs a{x.data_ptr(), x.stride(0), B, w.data_ptr(), K, b32.defined() ? b32.data_ptr<float>() : nullptr,
             y.data_ptr(), N};
  const int64_t tiles = N / 4;
  // ~64 KB of weights per task at least, so that small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { gemv_range(a, is_bf16, t0 * 4, t1 * 4); });
  for (int64_t n = tiles * 4; n < N; ++n) {
    if (is_bf16) gemv_row_scalar<bf16>(a, n); else gemv_row_scalar<float>(a, n);
  }
  return y;
}

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
  const int64_t tiles = w.size(0);
  const int64_t grain = std::max<int64_t>(2, 32768 / std::max<int64_t>(K * 32, 1) * 2);
  at::parallel_for(0, (tiles + 1) / 2, std::max<int64_t>(1, grain / 2), [&](int64_t p0, int64_t p1) {
    packed_range(a, p0 * 2, std::min(tiles, p1 * 2));
  });
  return y;
}

// x [T, H] float32, updated in place to x + delta when delta is given; returns
// rms_norm(x) * weight rounded once to bfloat16 (out_bf16) or float32.
template <typename TD, typename TO>
void add_rms_norm_rows(float* x, int64_t ldx, const TD* d, int64_t ldd, const float* w, TO* out, int64_t H,
                       float eps, int64_t t0, int64_t t1) {
  const int64_t hv = H / 8 * 8;
  for (int64_t t = t0; t < t1; ++t) {
    float* xr = x + t * ldx;
    __m256 ss = _mm256_setzero_ps();
    int64_t h = 0;
    for (; h < hv; h += 8) {
      __m256 v = _mm256_loadu_ps(xr + h);
      if (d) {
        v = _mm256_add_ps(v, load8(d + t * ldd + h));
        _mm256_storeu_ps(xr + h, v);
      }
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    float s = hsum8(ss);
    for (; h < H; ++h) {
      if (d) xr[h] += load1(d + t * ldd + h);
      s += xr[h] * xr[h];
    }
    const float inv = 1.0f / std::sqrt(s / float(H) + eps);
    const __m256 iv = _mm256_set1_ps(inv);
    TO* o = out + t * H;
    for (h = 0; h < hv; h += 8) store8(o + h, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + h), iv), _mm256_loadu_ps(w + h)));
    for (; h < H; ++h) store1(o + h, xr[h] * inv * w[h]);
  }
}

torch::Tensor add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                           double eps, bool out_bf16) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "add_rms_norm: x must be float32 [T, H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm: weight must be float32 [H]");
  const int64_t T = x.size(0), H = x.size(1);
  bool has_d = delta.has_value() && delta->defined();
  if (has_d) {
    TORCH_CHECK(delta->dim() == 2 && delta->size(0) == T && delta->size(1) == H && delta->stride(1) == 1,
                "add_rms_norm: delta shape");
    check_float(*delta, "delta");
  }
  auto out = torch::empty({T, H}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float e = float(eps);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    auto run = [&](auto* dp, int64_t ldd) {
      if (out_bf16) add_rms_norm_rows(xp, x.stride(0), dp, ldd, wp, reinterpret_cast<bf16*>(out.data_ptr()), H, e, t0, t1);
      else add_rms_norm_rows(xp, x.stride(0), dp, ldd, wp, out.data_ptr<float>(), H, e, t0, t1);
    };
    if (!has_d) run(static_cast<const float*>(nullptr), 0);
    else if (delta->scalar_type() == at::kFloat) run(delta->data_ptr<float>(), delta->stride(0));
    else run(reinterpret_cast<const bf16*>(delta->data_ptr()), delta->stride(0));
  });
  return out;
}

// gu [T, 2I] (gate then up) -> silu(gate) * up [T, I], computed in float32, rounded once.
template <typename T>
void silu_mul_rows(const T* gu, int64_t ld, T* out, int64_t I, int64_t t0, int64_t t1) {
  const int64_t iv = I / 8 * 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const T* g = gu + t * ld;
    const T* u = g + I;
    T* o = out + t * I;
    int64_t i = 0;
    for (; i < iv; i += 8) {
      __m256 gv = load8(g + i);
      __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      store8(o + i, _mm256_mul_ps(s, load8(u + i)));
    }
    for (; i < I; ++i) {
      float gv = load1(g + i);
      store1(o + i, gv / (1.0f + exp1(-gv)) * load1(u + i));
    }
  }
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
  check_cpu(gu, "gu");
  check_float(gu, "gu");
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0 && gu.stride(1) == 1, "silu_mul: gu must be [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    if (gu.scalar_type() == at::kFloat)
      silu_mul_rows(gu.data_ptr<float>(), gu.stride(0), out.data_ptr<float>(), I, t0, t1);
    else
      silu_mul_rows(reinterpret_cast<const bf16*>(gu.data_ptr()), gu.stride(0), reinterpret_cast<bf16*>(out.data_ptr()), I, t0, t1);
  });
  return out;
}

// In place on qkv [T, (H + 2 KVH) * D]: optional per-head RMSNorm of q and k (Qwen3), rotary on
// q and k (tables full width: out = x * cos + swap(x) * sin, swap exchanging halves (NeoX) or
// pairs (GPT-J)), computed in float32 and rounded once; then k and v are written into the paged
// cache [num_blocks, 2, block_size, KVH, D] at (slot_blocks[t], slot_offsets[t]).
template <typename T>
void rope_kv_rows(T* qkv, int64_t ld, const int64_t* pos, const float* cos, const float* sin, bool interleaved,
                  int64_t H, int64_t KVH, int64_t D, const float* qn, const float* kn, float eps, T* cache,
                  int64_t BS, const int64_t* sb, const int64_t* so, int64_t t0, int64_t t1) {
  std::vector<float> buf(D);
  for (int64_t t = t0; t < t1; ++t) {
    T* row = qkv + t * ld;
    const float* c = cos + pos[t] * D;
    const float* s = sin + pos[t] * D;
    for (int64_t h = 0; h < H + KVH; ++h) {
      T* x = row + h * D;
      for (int64_t d = 0; d < D; ++d) buf[d] = load1(x + d);
      const float* nw = h < H ? qn : kn;
      if (nw) {
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) ss += buf[d] * buf[d];
        const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
        for (int64_t d = 0; d < D; ++d) buf[d] = buf[d] * inv * nw[d];
      }
      if (interleaved) {
        for (int64_t d = 0; d < D; ++d) store1(x + d, buf[d] * c[d] + buf[d ^ 1] * s[d]);
      } else {
        const int64_t half = D / 2;
        for (int64_t d = 0; d < half; ++d) store1(x + d, buf[d] * c[d] + buf[d + half] * s[d]);
        for (int64_t d = half; d < D; ++d) store1(x + d, buf[d] * c[d] + buf[d - half] * s[d]);
      }
    }
    const int64_t base = (sb[t] * 2 * BS + so[t]) * KVH * D;
    std::memcpy(cache + base, row + H * D, KVH * D * sizeof(T));
    std::memcpy(cache + base + BS * KVH * D, row + (H + KVH) * D, KVH * D * sizeof(T));
  }
}

void rope_write_kv(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                   const torch::Tensor& sin, bool interleaved, int64_t num_heads, int64_t num_kv_heads,
                   torch::Tensor& kv_cache, const torch::Tensor& slot_blocks, const torch::Tensor& slot_offsets,
                   const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm, double eps) {
  check_cpu(qkv, "qkv");
  check_float(qkv, "qkv");
  const int64_t T = qkv.size(0), H = num_heads, KVH = num_kv_heads;
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2 && kv_cache.size(3) == KVH && kv_cache.is_contiguous(),
              "rope_write_kv: cache must be [blocks, 2, block_size, kv_heads, head_dim]");
  const int64_t D = kv_cache.size(4), BS = kv_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (H + 2 * KVH) * D, "rope_write_kv: qkv shape ", qkv.sizes());
  TORCH_CHECK(kv_cache.scalar_type() == qkv.scalar_type(), "rope_write_kv: cache dtype differs from qkv's");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope_write_kv: cos/sin tables must be float32 [max_position, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_blocks.scalar_type() == at::kLong &&
                  slot_offsets.scalar_type() == at::kLong && positions.numel() == T && slot_blocks.numel() == T &&
                  slot_offsets.numel() == T,
              "rope_write_kv: positions and slots must be int64 [T]");
  auto pos = positions.contiguous(), sb = slot_blocks.contiguous(), so = slot_offsets.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t maxpos = cos.size(0), nblocks = kv_cache.size(0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < maxpos, "rope_write_kv: position ", pp[t], " out of range");
    TORCH_CHECK(sb.data_ptr<int64_t>()[t] >= 0 && sb.data_ptr<int64_t>()[t] < nblocks &&
                    so.data_ptr<int64_t>()[t] >= 0 && so.data_ptr<int64_t>()[t] < BS,
                "rope_write_kv: slot out of range");
  }
  const float* qn = q_norm.has_value() && q_norm->defined() ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm.has_value() && k_norm->defined() ? k_norm->data_ptr<float>() : nullptr;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    if (qkv.scalar_type() == at::kFloat)
      rope_kv_rows(qkv.data_ptr<float>(), qkv.stride(0), pp, cos.data_ptr<float>(), sin.data_ptr<float>(), interleaved,
                   H, KVH, D, qn, kn, float(eps), kv_cache.data_ptr<float>(), BS, sb.data_ptr<int64_t>(),
                   so.data_ptr<int64_t>(), t0, t1);
    else
      rope_kv_rows(reinterpret_cast<bf16*>(qkv.data_ptr()), qkv.stride(0), pp, cos.data_ptr<float>(),
                   sin.data_ptr<float>(), interleaved, H, KVH, D, qn, kn, float(eps),
                   reinterpret_cast<bf16*>(kv_cache.data_ptr()), BS, sb.data_ptr<int64_t>(), so.data_ptr<int64_t>(),
                   t0, t1);
  });
}

// Decode attention over the paged cache, read in place. For each decode sequence i: its query
// is q[rows[i]] (H heads of D, strided rows), its context the first context_lens[i] tokens of
// the blocks in block_table[i]; out[rows[i]] = softmax(q k^T * scale) v, per head, with query
// head h reading kv head h / (H / KVH). float32 math, one rounding of the output.
// In place over G rows of length L (row stride Lp): softmax in float32.
inline void softmax_rows(float* sc, int64_t G, int64_t L, int64_t Lp) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * Lp;
    float m = -INFINITY;
    for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= L; t += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mv));
      _mm256_storeu_ps(sg + t, e);
      sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum8(sv);
    for (; t < L; ++t) {
      sg[t] = exp1(sg[t] - m);
      sum += sg[t];
    }
    const float inv = 1.0f / sum;
    for (t = 0; t < L; ++t) sg[t] *= inv;
  }
}

// Eight 8-lane partial sums -> one vector of their eight totals (lane i = sum of v[i]).
inline __m256 hsum8x8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  // ab = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low/high 128-bit halves of tokens 0-3), cd likewise for 4-7.
  __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
  return _mm256_add_ps(lo, hi);
}

// Scores and values for one (sequence, kv head) with the group size G fixed at compile time, so
// that each head's accumulators live in registers. D % 8 == 0. Token t's K row is
// k_rows[t] (pointers precomputed from the block table: no division in the loops).
template <typename T, int G>
void attn_group(const float* qf, const T* const* k_rows, const T* const* v_rows, int64_t L, int64_t Lp, int64_t D,
                float* sc, float* acc, float* pbuf) {
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - t0);
    for (int64_t o = 0; o < 8; ++o) {
      __m256 ag[G];
      for (int g = 0; g < G; ++g) ag[g] = _mm256_setzero_ps();
      if (o < n) {
        const T* k = k_rows[t0 + o];
        for (int64_t d = 0; d < D; d += 8) {
          __m256 kv = load8(k + d);
          for (int g = 0; g < G; ++g) ag[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + d), kv, ag[g]);
        }
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(pbuf + (g * 8 + o) * 8, ag[g]);
    }
    for (int g = 0; g < G; ++g) {
      __m256 v[8];
      for (int o = 0; o < 8; ++o) v[o] = _mm256_loadu_ps(pbuf + (g * 8 + o) * 8);
      _mm256_storeu_ps(sc + g * Lp + t0, hsum8x8(v));
    }
  }
  softmax_rows(sc, G, L, Lp);
  // Values in passes over DB * 8 dims: G * DB accumulators stay in registers, and each pass
  // reads one contiguous piece of every V row (a cache line for DB = 4 in bf16).
  constexpr int DB = G <= 3 ? 4 : (G <= 6 ? 2 : 1);
  int64_t d = 0;
  for (; d + DB * 8 <= D; d += DB * 8) {
    __m256 ag[G][DB];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DB; ++c) ag[g][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      __m256 vv[DB];
      for (int c = 0; c < DB; ++c) vv[c] = load8(v_rows[t] + d + c * 8);
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(sc + g * Lp + t);
        for (int c = 0; c < DB; ++c) ag[g][c] = _mm256_fmadd_ps(p, vv[c], ag[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DB; ++c) _mm256_storeu_ps(acc + g * D + d + c * 8, ag[g][c]);
  }
  for (; d < D; d += 8) {
    __m256 ag[G];
    for (int g = 0; g < G; ++g) ag[g] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      __m256 vv = load8(v_rows[t] + d);
      for (int g = 0; g < G; ++g) ag[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + g * Lp + t), vv, ag[g]);
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(acc + g * D + d, ag[g]);
  }
}

template <typename T>
void attn_group_generic(const float* qf, const T* const* k_rows, const T* const* v_rows, int64_t G, int64_t L,
                        int64_t Lp, int64_t D, float* sc, float* acc) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * load1(k_rows[t] + d);
      sc[g * Lp + t] = s;
    }
  softmax_rows(sc, G, L, Lp);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += sc[g * Lp + t] * load1(v_rows[t] + d);
}

// The AVX-512 BF16 variant for bf16 caches with D % 32 == 0: scores from BF16 dot products of
// the raw bf16 query and key (scaled afterwards), values in 16-lane float registers.
PDS_AVX512BF16 inline __m512 load16_bf16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int G>
PDS_AVX512BF16 void attn_group_bf16_avx512(const bf16* qh, float scale, const bf16* const* k_rows,
                                           const bf16* const* v_rows, int64_t L, int64_t Lp, int64_t D, float* sc,
                                           float* acc, float* pbuf) {
  const int64_t nc = D / 32;
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - t0);
    for (int64_t o = 0; o < 8; ++o) {
      __m512 ag[G];
      for (int g = 0; g < G; ++g) ag[g] = _mm512_setzero_ps();
      if (o < n) {
        const bf16* k = k_rows[t0 + o];
        for (int64_t c = 0; c < nc; ++c) {
          const __m512i kv = _mm512_loadu_si512(k + c * 32);
          for (int g = 0; g < G; ++g)
            ag[g] = _mm512_dpbf16_ps(ag[g], (__m512bh)kv, (__m512bh)_mm512_loadu_si512(qh + g * D + c * 32));
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(ag[g]), _mm512_extractf32x8_ps(ag[g], 1));
        _mm256_storeu_ps(pbuf + (g * 8 + o) * 8, half);
      }
    }
    const __m256 sv = _mm256_set1_ps(scale);
    for (int g = 0; g < G; ++g) {
      __m256 v[8];
      for (int o = 0; o < 8; ++o) v[o] = _mm256_loadu_ps(pbuf + (g * 8 + o) * 8);
      _mm256_storeu_ps(sc + g * Lp + t0, _mm256_mul_ps(hsum8x8(v), sv));
    }
  }
  softmax_rows(sc, G, L, Lp);
  constexpr int DB = G <= 6 ? 4 : 2;  // 16-float chunks per pass: G * DB accumulators
  const int64_t chunks = D / 16;
  for (int64_t c0 = 0; c0 < chunks; c0 += DB) {
    const int nb = int(std::min<int64_t>(DB, chunks - c0));
    __m512 ag[G][DB];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DB; ++c) ag[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      __m512 vv[DB];
      for (int c = 0; c < DB; ++c) vv[c] = c < nb ? load16_bf16(v_rows[t] + (c0 + c) * 16) : _mm512_setzero_ps();
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(sc[g * Lp + t]);
        for (int c = 0; c < DB; ++c) ag[g][c] = _mm512_fmadd_ps(p, vv[c], ag[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < nb; ++c) _mm512_storeu_ps(acc + g * D + (c0 + c) * 16, ag[g][c]);
  }
}

template <typename T>
bool attn_group_fast(const T*, float, const T* const*, const T* const*, int64_t, int64_t, int64_t, int64_t, float*,
                     float*, float*) {
  return false;
}

template <>
bool attn_group_fast<bf16>(const bf16* qh, float scale, const bf16* const* k_rows, const bf16* const* v_rows,
                           int64_t G, int64_t L, int64_t Lp, int64_t D, float* sc, float* acc, float* pbuf) {
  if (kIsa != Isa::kAvx512Bf16 || D % 32 != 0) return false;
  switch (G) {
    case 1: attn_group_bf16_avx512<1>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 2: attn_group_bf16_avx512<2>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 3: attn_group_bf16_avx512<3>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 4: attn_group_bf16_avx512<4>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 5: attn_group_bf16_avx512<5>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 6: attn_group_bf16_avx512<6>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    case 8: attn_group_bf16_avx512<8>(qh, scale, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); return true;
    default: return false;
  }
}

template <typename T>
void decode_attn_task(const T* q, int64_t ldq, const int64_t* rows, const T* cache, int64_t BS, int64_t KVH, int64_t D,
                      const int64_t* table, int64_t ldt, const int64_t* lens, int64_t H, float scale, T* out,
                      int64_t ldo, int64_t i, int64_t kvh, std::vector<float>& scratch, std::vector<const T*>& ptrs) {
  const int64_t G = H / KVH, L = lens[i], Lp = (L + 7) / 8 * 8;
  scratch.resize(size_t(G * (D + D + Lp) + G * 64));
  float* qf = scratch.data();  // [G, D], pre-scaled
  float* acc = qf + G * D;      // [G, D]
  float* sc = acc + G * D;      // [G, Lp] scores, then probabilities
  float* pbuf = sc + G * Lp;    // [G, 8 tokens, 8 lanes]
  const T* qrow = q + rows[i] * ldq;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load1(qrow + (kvh * G + g) * D + d) * scale;
  ptrs.resize(size_t(2 * L));
  const T** k_rows = ptrs.data();
  const T** v_rows = k_rows + L;
  const int64_t* tab = table + i * ldt;
  const int64_t tok = KVH * D;
  for (int64_t j = 0, t = 0; t < L; ++j) {
    const T* kb = cache + tab[j] * 2 * BS * tok + kvh * D;
    for (int64_t o = 0; o < BS && t < L; ++o, ++t) {
      k_rows[t] = kb + o * tok;
      v_rows[t] = kb + (BS + o) * tok;
    }
  }
  if (attn_group_fast(qrow + kvh * G * D, scale, k_rows, v_rows, G, L, Lp, D, sc, acc, pbuf)) {
    // done: bf16 on AVX-512 BF16
  } else if (D % 8 != 0) {
    attn_group_generic(qf, k_rows, v_rows, G, L, Lp, D, sc, acc);
  } else {
    switch (G) {
      case 1: attn_group<T, 1>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 2: attn_group<T, 2>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 3: attn_group<T, 3>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 4: attn_group<T, 4>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 5: attn_group<T, 5>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 6: attn_group<T, 6>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 7: attn_group<T, 7>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      case 8: attn_group<T, 8>(qf, k_rows, v_rows, L, Lp, D, sc, acc, pbuf); break;
      default: attn_group_generic(qf, k_rows, v_rows, G, L, Lp, D, sc, acc);
    }
  }
  T* orow = out + rows[i] * ldo;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) store1(orow + (kvh * G + g) * D + d, acc[g * D + d]);
}

void paged_decode_attention(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& kv_cache,
                            const torch::Tensor& block_table, const torch::Tensor& context_lens, int64_t num_heads,
                            double scale, torch::Tensor& out) {
  check_cpu(q, "q");
  check_float(q, "q");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(), "paged_decode_attention: cache layout");
  const int64_t BS = kv_cache.size(2), KVH = kv_cache.size(3), D = kv_cache.size(4), H = num_heads;
  TORCH_CHECK(H % KVH == 0, "paged_decode_attention: heads not a multiple of kv heads");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.size(1) >= H * D, "paged_decode_attention: q must be [T, >= H*D]");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.size(1) == H * D && out.size(0) == q.size(0) &&
                  out.scalar_type() == q.scalar_type() && kv_cache.scalar_type() == q.scalar_type(),
              "paged_decode_attention: out must be [T, H*D] in q's dtype, as the cache");
  auto r = rows.contiguous(), tab = block_table.contiguous(), lens = context_lens.contiguous();
  TORCH_CHECK(r.scalar_type() == at::kLong && tab.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged_decode_attention: rows, block_table and context_lens must be int64");
  const int64_t B = r.numel(), W = tab.size(1), nblocks = kv_cache.size(0);
  TORCH_CHECK(tab.dim() == 2 && tab.size(0) == B && lens.numel() == B, "paged_decode_attention: table shape");
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < q.size(0), "paged_decode_attention: row out of range");
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= W * BS, "paged_decode_attention: context length ", lp[i], " out of range");
    for (int64_t j = 0; j < (lp[i] + BS - 1) / BS; ++j)
      TORCH_CHECK(tp[i * W + j] >= 0 && tp[i * W + j] < nblocks, "paged_decode_attention: block id out of range");
  }
  const float sc = float(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> scratch;
    std::vector<const float*> fptrs;
    std::vector<const bf16*> bptrs;
    for (int64_t j = j0; j < j1; ++j) {
      if (q.scalar_type() == at::kFloat)
        decode_attn_task(q.data_ptr<float>(), q.stride(0), rp, kv_cache.data_ptr<float>(), BS, KVH, D, tp, W, lp, H, sc,
                         out.data_ptr<float>(), out.stride(0), j / KVH, j % KVH, scratch, fptrs);
      else
        decode_attn_task(reinterpret_cast<const bf16*>(q.data_ptr()), q.stride(0), rp,
                         reinterpret_cast<const bf16*>(kv_cache.data_ptr()), BS, KVH, D, tp, W, lp, H, sc,
                         reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0), j / KVH, j % KVH, scratch, bptrs);
    }
  });
}

std::string isa_name() {
  switch (kIsa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    default: return "avx2";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pdserve CPU decode kernels";
  m.def("linear", &linear, "small-batch linear (GEMV) streaming each weight once", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("linear_packed", &linear_packed, "small-batch linear over prepacked bf16 weights", py::arg("x"), py::arg("w"),
        py::arg("n"), py::arg("bias") = py::none());
  m.def("add_rms_norm", &add_rms_norm, "x += delta (in place); rms_norm(x) * w", py::arg("x"), py::arg("delta"),
        py::arg("weight"), py::arg("eps"), py::arg("out_bf16"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I]");
  m.def("rope_write_kv", &rope_write_kv, "rotary (and qk-norm) in place, k/v into the paged cache");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV, read in place");
  m.def("isa", &isa_name, "the instruction set the GEMV dispatches to");
}
