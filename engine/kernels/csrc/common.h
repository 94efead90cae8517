// Shared helpers of the pdserve CPU kernels: bf16 <-> float, 8-lane AVX2 loads/stores/sums, a
// vectorised exp, the instruction set chosen at run time, and argument checks.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#define PDS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define PDS_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))


namespace pdk {

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
  // Round to nearest even in integer arithmetic (no AVX-512 BF16 needed), as f2bf does: a NaN
  // stays a NaN (quieted) instead of rounding up into an infinity.
  const __m256i raw = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(raw, 16), _mm256_set1_epi32(1));
  __m256i u = _mm256_add_epi32(raw, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  u = _mm256_srli_epi32(u, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  u = _mm256_blendv_epi8(u, _mm256_or_si256(_mm256_srli_epi32(raw, 16), _mm256_set1_epi32(0x40)), nan);
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

// exp over 16 lanes, the same reduction and polynomial as exp8 (common.h); -inf and anything
// below -87 give 0.
PDS_AVX512BF16 inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.3f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

// 1 / x over 16 lanes: the 14-bit estimate and one Newton step (within 2 ulp of the quotient,
// for the values silu takes here: x >= 1), about 5x the throughput of a division.
PDS_AVX512BF16 inline __m512 recip16(__m512 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}

inline float exp1(float x) {
  alignas(32) float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(buf, exp8(_mm256_load_ps(buf)));
  return buf[0];
}


// Ordered: each tier has everything the one before it has (AMX hosts run the AVX-512 BF16 paths
// of every kernel but the GEMV).
enum class Isa { kAvx2 = 0, kAvx512Bf16 = 1, kAmx = 2 };
extern const Isa kIsa;  // detected once at load (gemv.cpp)

inline bool has_avx512bf16() { return kIsa >= Isa::kAvx512Bf16; }

// y[b, n] = x[b, :] . w[n, :] + bias[n] over weights packed as [N/16][K/2][16][2] bf16.
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

// The tile configuration LDTILECFG reads (palette 1: 8 tiles of up to 16 rows x 64 bytes).
struct alignas(64) AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The AMX tile path (gemm_amx.cpp) over N-tiles [t0, t1) for every row; K % 32 == 0. With
// `silu`, tiles come in (gate, up) pairs and y [B, N/2] gets silu(gate) * up (t0 even).
void amx_packed_range(const PackedArgs& a, int64_t t0, int64_t t1, bool silu);
bool amx_usable();  // the CPU has AMX-BF16 and the kernel granted this process the tile state

inline void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

inline void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// The ops the Python module exposes (bindings.cpp).
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                            const c10::optional<torch::Tensor>& bias);
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales, int64_t n,
                          int64_t group, const c10::optional<torch::Tensor>& bias);
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t n, int64_t group, const c10::optional<torch::Tensor>& bias);
torch::Tensor linear_packed_silu(const torch::Tensor& x, const torch::Tensor& w, int64_t intermediate);
torch::Tensor add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                           double eps, bool out_bf16);
torch::Tensor silu_mul(const torch::Tensor& gu);
void rope_write_kv(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                   const torch::Tensor& sin, bool interleaved, int64_t num_heads, int64_t num_kv_heads,
                   torch::Tensor& kv_cache, const torch::Tensor& slot_blocks, const torch::Tensor& slot_offsets,
                   const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm, double eps);
void paged_decode_attention(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& kv_cache,
                            const torch::Tensor& block_table, const torch::Tensor& context_lens, int64_t num_heads,
                            double scale, torch::Tensor& out);
// Causal attention of prefill chunks (rows [starts[i], ends[i]) of q, each with context_lens[i]
// tokens of KV already in the cache under block_tables[i]) read in place; AMX, bf16.
void paged_prefill_attention(const torch::Tensor& q, const std::vector<int64_t>& starts,
                             const std::vector<int64_t>& ends, const std::vector<int64_t>& context_lens,
                             const std::vector<torch::Tensor>& block_tables, const torch::Tensor& kv_cache,
                             int64_t num_heads, double scale, torch::Tensor& out);
// The LM head's logits: bf16 -> float32 with near-ties re-scored exactly; greedy argmax of rows.
torch::Tensor refine_logits(const torch::Tensor& logits, const torch::Tensor& hidden, const torch::Tensor& weight,
                            double rel_tol, double abs_tol);
std::vector<int64_t> argmax_rows(const torch::Tensor& logits, const std::vector<int64_t>& rows);
std::string isa_name();

// One projection of decode_layer: packed bf16 (linear_packed, `group` 0) or 4-bit (linear_int4).
struct Projection {
  torch::Tensor w, scales, zeros;
  c10::optional<torch::Tensor> bias;
  int64_t n = 0, group = 0;
  torch::Tensor operator()(const torch::Tensor& x) const;
};

// One dense layer's weights for decode_layer (layer.cpp), gathered once by the model: its four
// projections (gate_up interleaved when `fused_silu`), norms, attention shape, its KV cache.
struct DecodeLayerWeights {
  Projection qkv, o, gate_up, down;
  torch::Tensor post_norm, kv_cache;
  c10::optional<torch::Tensor> q_norm, k_norm;
  int64_t intermediate = 0, num_heads = 0, num_kv_heads = 0;
  double post_eps = 1e-6, qk_eps = 0.0, scale = 1.0;
  bool fused_silu = false;
};

// A decode-only step's metadata, shared by every layer.
struct DecodeStep {
  torch::Tensor positions, cos, sin, slot_blocks, slot_offsets, rows, block_table, lens;
  bool interleaved = false;
};

torch::Tensor decode_layer(const DecodeLayerWeights& w, const DecodeStep& s, torch::Tensor& x, const torch::Tensor& h,
                           const torch::Tensor& next_norm, double next_eps, bool next_bf16);

}  // namespace pdk
