// Small-batch linear layers for decode: y[b, n] = x[b, :] . w[n, :] + bias[n], streaming each
// weight byte from memory once per call whatever the batch. Row-major weights (any dtype) and
// the packed bf16 layout (engine/kernels/packing.py).
#include "common.h"

namespace pdk {

// PDSERVE_KERNEL_ISA=avx2|avx512 caps the choice, so that the lower paths are tested (and can be
// compared) on a host that has more; it never raises it above what the CPU has.
static Isa detect_isa() {
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  Isa found = avx512 ? (__builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512) : Isa::kAvx2;
  const char* cap = std::getenv("PDSERVE_KERNEL_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return Isa::kAvx2;
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0 && found == Isa::kAvx512Bf16) return Isa::kAvx512;
  return found;
}

const Isa kIsa = detect_isa();

namespace {

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


}  // namespace

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

std::string isa_name() {
  switch (kIsa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    default: return "avx2";
  }
}


}  // namespace pdk
