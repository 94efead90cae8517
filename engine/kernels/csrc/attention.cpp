// Decode attention over the paged KV cache, read where the blocks lie (no gather copy).
#include "common.h"

namespace pdk {

namespace {

// KV rows are short (head_dim values) and scattered over blocks: fetch a few tokens ahead, as the
// hardware prefetchers cannot guess the next block.
constexpr int64_t kPrefetchTokens = 8;

template <typename T>
inline void prefetch_row(const T* const* rows, int64_t t, int64_t L, int64_t D) {
  if (t < L) {
    const char* p = reinterpret_cast<const char*>(rows[t]);
    for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// Rows of L scores (row stride Lp, a multiple of 8) -> probabilities, in 8-lane vectors: the
// padding up to Lp is set to -inf first, so every pass runs over whole vectors.
inline void softmax_rows(float* sc, int64_t G, int64_t L, int64_t Lp) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * Lp;
    for (int64_t t = L; t < Lp; ++t) sg[t] = -INFINITY;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < Lp; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    mv = _mm256_set1_ps(_mm_cvtss_f32(m4));
    __m256 sv = _mm256_setzero_ps();
    for (int64_t t = 0; t < Lp; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mv));
      _mm256_storeu_ps(sg + t, e);
      sv = _mm256_add_ps(sv, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sv));
    for (int64_t t = 0; t < Lp; t += 8) _mm256_storeu_ps(sg + t, _mm256_mul_ps(_mm256_loadu_ps(sg + t), inv));
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

// Per head, eight tokens' 8-lane partial dot products (pbuf [G, 8, 8]) -> their eight scores,
// times `scale`, into sc[g * Lp + t0 ..].
inline void store_scores(const float* pbuf, int64_t G, float* sc, int64_t Lp, int64_t t0, float scale) {
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    __m256 v[8];
    for (int o = 0; o < 8; ++o) v[o] = _mm256_loadu_ps(pbuf + (g * 8 + o) * 8);
    _mm256_storeu_ps(sc + g * Lp + t0, _mm256_mul_ps(hsum8x8(v), sv));
  }
}

// One token's 8-lane partial dot products with G pre-scaled float32 query heads (k nullptr: a
// padding slot, all zeros) -> slot o of pbuf [G, 8 tokens, 8 lanes], folded by store_scores.
template <typename T, int G>
inline void score_row_f32(const T* k, const float* qf, int64_t D, float* pbuf, int64_t o) {
  __m256 ag[G];
  for (int g = 0; g < G; ++g) ag[g] = _mm256_setzero_ps();
  if (k != nullptr) {
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(k + d);
      for (int g = 0; g < G; ++g) ag[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + d), kv, ag[g]);
    }
  }
  for (int g = 0; g < G; ++g) _mm256_storeu_ps(pbuf + (g * 8 + o) * 8, ag[g]);
}

// acc[g * D + d] += sum over tokens t < n of p[g * Lp + t] * row(t)[d], for G heads sharing one
// kv head: passes over DB * 8 dims keep G * DB accumulators in registers, and each pass reads one
// contiguous piece of every V row (a cache line for DB = 4 in bf16). Tokens are added in order,
// so a walk that calls this block by block gets the bits of one call over the whole sequence.
// pf_rows (optional, pf_len rows): V rows to prefetch ahead during the first pass.
template <typename T, int G, typename Row>
inline void add_values(float* acc, int64_t D, const float* p, int64_t Lp, int64_t n, Row row,
                       const T* const* pf_rows, int64_t pf_len) {
  constexpr int DB = G <= 3 ? 4 : (G <= 6 ? 2 : 1);
  int64_t d = 0;
  for (; d + DB * 8 <= D; d += DB * 8) {
    __m256 ag[G][DB];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DB; ++c) ag[g][c] = _mm256_loadu_ps(acc + g * D + d + c * 8);
    for (int64_t t = 0; t < n; ++t) {
      if (d == 0 && pf_rows != nullptr) prefetch_row(pf_rows, t + kPrefetchTokens, pf_len, D);
      const T* v = row(t);
      __m256 vv[DB];
      for (int c = 0; c < DB; ++c) vv[c] = load8(v + d + c * 8);
      for (int g = 0; g < G; ++g) {
        const __m256 pg = _mm256_broadcast_ss(p + g * Lp + t);
        for (int c = 0; c < DB; ++c) ag[g][c] = _mm256_fmadd_ps(pg, vv[c], ag[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DB; ++c) _mm256_storeu_ps(acc + g * D + d + c * 8, ag[g][c]);
  }
  for (; d < D; d += 8) {
    __m256 ag[G];
    for (int g = 0; g < G; ++g) ag[g] = _mm256_loadu_ps(acc + g * D + d);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 vv = load8(row(t) + d);
      for (int g = 0; g < G; ++g) ag[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * Lp + t), vv, ag[g]);
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(acc + g * D + d, ag[g]);
  }
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
      if (o < n) prefetch_row(k_rows, t0 + o + kPrefetchTokens, L, D);
      score_row_f32<T, G>(o < n ? k_rows[t0 + o] : nullptr, qf, D, pbuf, o);
    }
    store_scores(pbuf, G, sc, Lp, t0, 1.0f);  // q came pre-scaled
  }
  softmax_rows(sc, G, L, Lp);
  std::fill(acc, acc + G * D, 0.f);
  add_values<T, G>(acc, D, sc, Lp, L, [&](int64_t t) { return v_rows[t]; }, v_rows, L);
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

// Partial dot products of G bf16 query heads with one bf16 K row (nullptr: a padding slot) ->
// slot o of pbuf [G, 8 tokens, 8 lanes], folded to 8 lanes for store_scores.
template <int G>
PDS_AVX512BF16 inline void score_row_bf16(const bf16* k, const bf16* qh, int64_t D, float* pbuf, int64_t o) {
  __m512 ag[G];
  for (int g = 0; g < G; ++g) ag[g] = _mm512_setzero_ps();
  if (k != nullptr) {
    for (int64_t c = 0; c < D / 32; ++c) {
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

template <int G>
PDS_AVX512BF16 void attn_group_bf16_avx512(const bf16* qh, float scale, const bf16* const* k_rows,
                                           const bf16* const* v_rows, int64_t L, int64_t Lp, int64_t D, float* sc,
                                           float* acc, float* pbuf) {
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - t0);
    for (int64_t o = 0; o < 8; ++o) {
      if (o < n) prefetch_row(k_rows, t0 + o + kPrefetchTokens, L, D);
      score_row_bf16<G>(o < n ? k_rows[t0 + o] : nullptr, qh, D, pbuf, o);
    }
    store_scores(pbuf, G, sc, Lp, t0, scale);
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
      if (c0 == 0) prefetch_row(v_rows, t + kPrefetchTokens, L, D);
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
  if (!has_avx512bf16() || D % 32 != 0) return false;
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

// One sequence, every kv head, walked block by block (AVX-512 BF16, bf16 cache, D % 32 == 0,
// BS % 8 == 0): each block's K part, then its V part, is read as one 2 x BS x KVH x D-byte run
// instead of KVH strided thirds at different times, which memory serves about twice as fast.
// Same arithmetic per head as attn_group_bf16_avx512 (scores from BF16 dot products, float32
// softmax and values), so results do not depend on which of the two runs.
template <int G>
PDS_AVX512BF16 void attn_seq_bf16_avx512(const bf16* q, float scale, const bf16* cache, const int64_t* tab, int64_t L,
                                         int64_t BS, int64_t KVH, int64_t D, float* sc, int64_t Lp, float* acc,
                                         float* pbuf, bf16* out) {
  const int64_t tok = KVH * D, chunks = D / 16, nblk = (L + BS - 1) / BS;
  for (int64_t j = 0; j < nblk; ++j) {
    const bf16* kb = cache + tab[j] * 2 * BS * tok;
    const int64_t base = j * BS, n_in = std::min(BS, L - base);
    if (j + 1 < nblk) {  // the next block's K part, while this one computes
      const char* nk = reinterpret_cast<const char*>(cache + tab[j + 1] * 2 * BS * tok);
      for (int64_t b = 0; b < BS * tok * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T1);
    }
    for (int64_t h = 0; h < KVH; ++h) {
      const bf16* qh = q + h * G * D;
      for (int64_t t0 = 0; t0 < n_in; t0 += 8) {
        const int64_t n = std::min<int64_t>(8, n_in - t0);
        for (int64_t o = 0; o < 8; ++o)
          score_row_bf16<G>(o < n ? kb + (t0 + o) * tok + h * D : nullptr, qh, D, pbuf, o);
        store_scores(pbuf, G, sc + h * G * Lp, Lp, base + t0, scale);
      }
    }
  }
  softmax_rows(sc, KVH * G, L, Lp);
  std::fill(acc, acc + KVH * G * D, 0.f);
  constexpr int DB = G <= 6 ? 4 : 2;
  for (int64_t j = 0; j < nblk; ++j) {
    const bf16* vb = cache + tab[j] * 2 * BS * tok + BS * tok;
    const int64_t base = j * BS, n_in = std::min(BS, L - base);
    if (j + 1 < nblk) {
      const char* nv = reinterpret_cast<const char*>(cache + tab[j + 1] * 2 * BS * tok + BS * tok);
      for (int64_t b = 0; b < BS * tok * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T1);
    }
    for (int64_t h = 0; h < KVH; ++h) {
      for (int64_t c0 = 0; c0 < chunks; c0 += DB) {
        const int nb = int(std::min<int64_t>(DB, chunks - c0));
        __m512 ag[G][DB];
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < DB; ++c)
            ag[g][c] = c < nb ? _mm512_loadu_ps(acc + (h * G + g) * D + (c0 + c) * 16) : _mm512_setzero_ps();
        for (int64_t o = 0; o < n_in; ++o) {
          const bf16* v = vb + o * tok + h * D;
          __m512 vv[DB];
          for (int c = 0; c < DB; ++c) vv[c] = c < nb ? load16_bf16(v + (c0 + c) * 16) : _mm512_setzero_ps();
          for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(sc[(h * G + g) * Lp + base + o]);
            for (int c = 0; c < DB; ++c) ag[g][c] = _mm512_fmadd_ps(p, vv[c], ag[g][c]);
          }
        }
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < nb; ++c) _mm512_storeu_ps(acc + (h * G + g) * D + (c0 + c) * 16, ag[g][c]);
      }
    }
  }
  for (int64_t i = 0; i < KVH * G * D; ++i) out[i] = f2bf(acc[i]);
}


// The AVX2 counterpart of attn_seq_bf16_avx512 (bf16 cache, D % 8 == 0, BS % 8 == 0): one
// sequence's every kv head walked block by block, so each block's K part, then its V part, is
// read as one contiguous run. Without it each (sequence, kv head) task reads a strided third of
// every token row, which memory serves at ~4 GB/s where a run of the same bytes reads at ~16.
// Both walks score with score_row_f32 and sum values with add_values (tokens in order), so
// they give the same bits and batch size never changes a result.
template <int G>
void attn_seq_avx2(const bf16* q, float scale, const bf16* cache, const int64_t* tab, int64_t L, int64_t BS,
                   int64_t KVH, int64_t D, float* qf, float* sc, int64_t Lp, float* acc, float* pbuf, bf16* out) {
  const int64_t tok = KVH * D, nblk = (L + BS - 1) / BS;
  for (int64_t i = 0; i < KVH * G * D; ++i) qf[i] = bf2f(q[i]) * scale;
  for (int64_t j = 0; j < nblk; ++j) {
    const bf16* kb = cache + tab[j] * 2 * BS * tok;
    const int64_t base = j * BS, n_in = std::min(BS, L - base);
    if (j + 1 < nblk) {  // the next block's K part, while this one computes
      const char* nk = reinterpret_cast<const char*>(cache + tab[j + 1] * 2 * BS * tok);
      for (int64_t b = 0; b < BS * tok * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T1);
    }
    for (int64_t h = 0; h < KVH; ++h) {
      for (int64_t t0 = 0; t0 < n_in; t0 += 8) {
        const int64_t n = std::min<int64_t>(8, n_in - t0);
        for (int64_t o = 0; o < 8; ++o)
          score_row_f32<bf16, G>(o < n ? kb + (t0 + o) * tok + h * D : nullptr, qf + h * G * D, D, pbuf, o);
        store_scores(pbuf, G, sc + h * G * Lp, Lp, base + t0, 1.0f);
      }
    }
  }
  softmax_rows(sc, KVH * G, L, Lp);
  std::fill(acc, acc + KVH * G * D, 0.f);
  for (int64_t j = 0; j < nblk; ++j) {
    const bf16* vb = cache + tab[j] * 2 * BS * tok + BS * tok;
    const int64_t base = j * BS, n_in = std::min(BS, L - base);
    if (j + 1 < nblk) {
      const char* nv = reinterpret_cast<const char*>(cache + tab[j + 1] * 2 * BS * tok + BS * tok);
      for (int64_t b = 0; b < BS * tok * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T1);
    }
    for (int64_t h = 0; h < KVH; ++h)
      add_values<bf16, G>(acc + h * G * D, D, sc + h * G * Lp + base, Lp, n_in,
                          [&](int64_t o) { return vb + o * tok + h * D; }, nullptr, 0);
  }
  for (int64_t i = 0; i < KVH * G * D; ++i) out[i] = f2bf(acc[i]);
}

// The per-sequence path for sequence i, or false where it does not apply (then per kv head).
bool attn_seq_fast(const bf16* q, int64_t ldq, const int64_t* rows, const bf16* cache, int64_t BS, int64_t KVH,
                   int64_t D, const int64_t* table, int64_t ldt, const int64_t* lens, int64_t H, float scale, bf16* out,
                   int64_t ldo, int64_t i, std::vector<float>& scratch) {
  const int64_t G = H / KVH, L = lens[i], Lp = (L + 7) / 8 * 8;
  scratch.resize(size_t(H * (Lp + 2 * D) + G * 64));
  float* sc = scratch.data();
  float* acc = sc + H * Lp;
  float* qf = acc + H * D;
  float* pbuf = qf + H * D;
  const bf16* qr = q + rows[i] * ldq;
  const int64_t* tab = table + i * ldt;
  bf16* o = out + rows[i] * ldo;
  if (has_avx512bf16()) {
    switch (G) {
#define PDK_SEQ_CASE(n) \
      case n: attn_seq_bf16_avx512<n>(qr, scale, cache, tab, L, BS, KVH, D, sc, Lp, acc, pbuf, o); return true;
      PDK_SEQ_CASE(1) PDK_SEQ_CASE(2) PDK_SEQ_CASE(3) PDK_SEQ_CASE(4) PDK_SEQ_CASE(5) PDK_SEQ_CASE(6) PDK_SEQ_CASE(8)
#undef PDK_SEQ_CASE
      default: return false;
    }
  }
  switch (G) {
#define PDK_SEQ_CASE(n) \
    case n: attn_seq_avx2<n>(qr, scale, cache, tab, L, BS, KVH, D, qf, sc, Lp, acc, pbuf, o); return true;
    PDK_SEQ_CASE(1) PDK_SEQ_CASE(2) PDK_SEQ_CASE(3) PDK_SEQ_CASE(4) PDK_SEQ_CASE(5) PDK_SEQ_CASE(6) PDK_SEQ_CASE(7)
    PDK_SEQ_CASE(8)
#undef PDK_SEQ_CASE
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
  const bool done = attn_group_fast(qrow + kvh * G * D, scale, k_rows, v_rows, G, L, Lp, D, sc, acc, pbuf);
  if (!done) {  // the other paths take the query as pre-scaled floats
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load1(qrow + (kvh * G + g) * D + d) * scale;
  }
  if (done) {
    // bf16 on AVX-512 BF16
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

}  // namespace

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
  const int64_t G = H / KVH;
  // Whole sequences per task where there are enough of them to share out (and the block-major
  // kernel applies); otherwise (a few long sequences) one task per (sequence, kv head).
  const bool seq_kernel = has_avx512bf16() ? D % 32 == 0 && (G <= 6 || G == 8) : D % 8 == 0 && G <= 8;
  const bool per_seq = q.scalar_type() == at::kBFloat16 && seq_kernel && BS % 8 == 0 && B >= 2 * at::get_num_threads();
  if (per_seq) {
    at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scratch;
      for (int64_t i = i0; i < i1; ++i)
        attn_seq_fast(reinterpret_cast<const bf16*>(q.data_ptr()), q.stride(0), rp,
                      reinterpret_cast<const bf16*>(kv_cache.data_ptr()), BS, KVH, D, tp, W, lp, H, sc,
                      reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0), i, scratch);
    });
    return;
  }
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


}  // namespace pdk
