// Prefill attention over the paged cache: each prefill chunk's queries against its whole context,
// read where it lies in the cache (keys and values were written there by rope_write_kv), causal,
// with an online softmax (flash attention). No gather, no transposed copies of q/k/v, no mask
// tensor: what SDPA needed all of. AMX tiles where the CPU has them, else AVX-512 BF16 dot
// products over the same layouts.
//
// One task is 16 queries of one head. Both paths compute transposed products so that every
// softmax statistic is a 16-lane vector over the task's queries:
//   S^T [16 keys x 16 queries] = K . Q^T     A = 16 key rows straight from the cache (stride one
//                                            token), B = the queries as VNNI pairs (built once)
//   O^T [16 d x 16 queries] += V^T . P^T     A = V^T rows (built once per kv head and chunk call,
//                                            shared by the group's heads and all query tiles),
//                                            B = probabilities as VNNI pairs of keys
// so the causal mask, the running max and sum, and the rescale of O are plain vertical
// AVX-512 operations. Keys go 64 at a time (4 score tiles) between rescales. Without AMX a
// score lane is a chain of BF16 dot products of a query pair vector with a broadcast key pair,
// and an O^T row one of a probability pair vector with a broadcast V^T pair.
#include "common.h"

#include <array>
#include <memory>

namespace pdk {

namespace {

// Every tile 16 rows x 64 bytes: tmm0-3 score tiles (tmm0 also the PV accumulator), tmm4 the A
// operand (keys, then V^T), tmm5 queries, tmm6-7 the two 32-key halves of P^T.
PDS_AMX void configure_attention_tiles() {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] is row i).
PDS_AVX512BF16 inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4a + c], 128-bit lane L: column 4L + c of rows 4a .. 4a + 3.
  for (int a = 0; a < 16; a += 4) {
    u[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
    u[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
    u[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
    u[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
  }
}

// Two rows of 16 bf16 -> 16 dwords (a[i] low, b[i] high): a VNNI pair row.
PDS_AVX512BF16 inline __m512i pair_rows(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

struct Segment {
  int64_t start, n, context;  // rows [start, start + n) of q; context tokens of KV incl. these
  const int64_t* table;
  int64_t vt_offset;  // this segment's V^T in the scratch buffer (elements)
  int64_t cpad;       // context rounded up to 64: the row length of its V^T
};

struct PrefillArgs {
  const bf16* q;
  int64_t ldq;
  const bf16* cache;
  int64_t BS, KVH, D, H;
  float scale;
  bf16* out;
  int64_t ldo;
  bf16* vt;  // per (segment, kv head): [D][cpad], zero past the context
};

inline const bf16* token_row(const PrefillArgs& a, const Segment& s, int64_t half, int64_t kvh, int64_t key) {
  const int64_t block = s.table[key / a.BS], off = key % a.BS;
  return a.cache + (((block * 2 + half) * a.BS + off) * a.KVH + kvh) * a.D;
}

// V^T of keys [k0, k0 + 32) of kv head `kvh`: for each 16-wide d group, 16 key pairs become 16
// VNNI dword rows, transposed into 16 rows of V^T.
PDS_AVX512BF16 void build_vt_chunk(const PrefillArgs& a, const Segment& s, int64_t kvh, int64_t k0) {
  bf16* vt = a.vt + s.vt_offset + kvh * a.D * s.cpad;
  for (int64_t d0 = 0; d0 < a.D; d0 += 16) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t k = k0 + 2 * j;
      const __m256i zero = _mm256_setzero_si256();
      const __m256i lo = k < s.context ? _mm256_loadu_si256((const __m256i*)(token_row(a, s, 1, kvh, k) + d0)) : zero;
      const __m256i hi = k + 1 < s.context ? _mm256_loadu_si256((const __m256i*)(token_row(a, s, 1, kvh, k + 1) + d0)) : zero;
      r[j] = pair_rows(lo, hi);
    }
    transpose16x16(r);
    for (int m = 0; m < 16; ++m) _mm512_storeu_si512(vt + (d0 + m) * s.cpad + k0, r[m]);
  }
}

// Scratch of one task, 64-byte aligned.
struct alignas(64) TaskScratch {
  int32_t qt[8][16][16];  // queries as VNNI pairs, per 32-wide d step (D <= 256)
  float s[64][16];        // scores, then probabilities, of a 64-key chunk
  int32_t p[32][16];      // probabilities as VNNI key pairs
  float tmp[16][16];      // one O^T tile of the chunk
  float o[256][16];       // O^T accumulators
};

// Queries [q0, q0 + nq) of head h -> w.qt: row r of d step ds holds dword ds * 16 + r (the d pair
// 32 ds + 2r, 32 ds + 2r + 1) of each of the 16 queries.
PDS_AVX512BF16 inline void transpose_queries(const PrefillArgs& a, const Segment& s, int64_t h, int64_t q0, int64_t nq,
                                             TaskScratch& w) {
  for (int64_t ds = 0; ds < a.D / 32; ++ds) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < nq ? _mm512_loadu_si512(a.q + (s.start + q0 + i) * a.ldq + h * a.D + ds * 32) : _mm512_setzero_si512();
    transpose16x16(r);
    for (int i = 0; i < 16; ++i) _mm512_store_si512(w.qt[ds][i], r[i]);
  }
}

// Scores of keys [k, k + 4) against the task's 16 queries (w.s[k + j]): key rows from the cache.
// Rows past `kn` repeat the last key and are not stored.
PDS_AVX512BF16 inline void score4(const PrefillArgs& a, const Segment& s, int64_t kvh, int64_t kc, int k, int kn,
                                  TaskScratch& w) {
  const int32_t* kr[4];
  for (int j = 0; j < 4; ++j)
    kr[j] = reinterpret_cast<const int32_t*>(token_row(a, s, 0, kvh, kc + std::min(k + j, kn - 1)));
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  const int32_t* qt = &w.qt[0][0][0];
  for (int64_t p = 0; p < a.D / 2; ++p) {
    const __m512bh qv = (__m512bh)_mm512_load_si512(qt + p * 16);
    s0 = _mm512_dpbf16_ps(s0, qv, (__m512bh)_mm512_set1_epi32(kr[0][p]));
    s1 = _mm512_dpbf16_ps(s1, qv, (__m512bh)_mm512_set1_epi32(kr[1][p]));
    s2 = _mm512_dpbf16_ps(s2, qv, (__m512bh)_mm512_set1_epi32(kr[2][p]));
    s3 = _mm512_dpbf16_ps(s3, qv, (__m512bh)_mm512_set1_epi32(kr[3][p]));
  }
  _mm512_store_ps(w.s[k], s0);
  if (k + 1 < kn) _mm512_store_ps(w.s[k + 1], s1);
  if (k + 2 < kn) _mm512_store_ps(w.s[k + 2], s2);
  if (k + 3 < kn) _mm512_store_ps(w.s[k + 3], s3);
}

// O^T rows [d0, d0 + 16) of one 64-key chunk: o = o * alpha + sum over key pairs r < np of
// P^T pair r . V^T pair (d, kc + 2r). Sixteen named accumulators: an array of them is what GCC
// kept in registers and stored to the stack every step elsewhere (see gemv.cpp).
#define PDK_PV_ROW(i) a##i = _mm512_dpbf16_ps(a##i, pv, (__m512bh)_mm512_set1_epi32(v[(i) * ld]));
#define PDK_PV_OUT(i) \
  _mm512_store_ps(w.o[d0 + i], _mm512_fmadd_ps(_mm512_load_ps(w.o[d0 + i]), alpha, a##i));
PDS_AVX512BF16 __attribute__((noinline)) void pv16(const bf16* vt, int64_t cpad, int64_t d0, int64_t kc, int np,
                                                   __m512 alpha, TaskScratch& w) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  __m512 a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
  const int64_t ld = cpad / 2;  // dwords per V^T row
  for (int r = 0; r < np; ++r) {
    const __m512bh pv = (__m512bh)_mm512_load_si512(w.p[r]);
    const int32_t* v = reinterpret_cast<const int32_t*>(vt + d0 * cpad + kc) + r;
    PDK_PV_ROW(0) PDK_PV_ROW(1) PDK_PV_ROW(2) PDK_PV_ROW(3) PDK_PV_ROW(4) PDK_PV_ROW(5) PDK_PV_ROW(6) PDK_PV_ROW(7)
    PDK_PV_ROW(8) PDK_PV_ROW(9) PDK_PV_ROW(10) PDK_PV_ROW(11) PDK_PV_ROW(12) PDK_PV_ROW(13) PDK_PV_ROW(14) PDK_PV_ROW(15)
  }
  PDK_PV_OUT(0) PDK_PV_OUT(1) PDK_PV_OUT(2) PDK_PV_OUT(3) PDK_PV_OUT(4) PDK_PV_OUT(5) PDK_PV_OUT(6) PDK_PV_OUT(7)
  PDK_PV_OUT(8) PDK_PV_OUT(9) PDK_PV_OUT(10) PDK_PV_OUT(11) PDK_PV_OUT(12) PDK_PV_OUT(13) PDK_PV_OUT(14) PDK_PV_OUT(15)
}
#undef PDK_PV_ROW
#undef PDK_PV_OUT

// Scale, causal mask and online softmax of one chunk's scores w.s[0, kn) (keys kc + k): updates
// the running max m and sum l, writes the probabilities to w.p as VNNI key pairs (zero past kn)
// and returns the factor by which the O accumulated so far must be rescaled. Key kc + k is
// visible to query lane i when kc + k <= base + q0 + i; masked scores are replaced, never added
// to (rows past the context may hold stale cache data). The first chunk holds key 0, which every
// query sees, so m is finite after it.
PDS_AVX512BF16 inline __m512 softmax_chunk(TaskScratch& w, int64_t kc, int kn, int64_t base, int64_t q0, float scale_f,
                                           __m512& m, __m512& l) {
  const __m512 scale = _mm512_set1_ps(scale_f);
  __m512 mnew = m;
  for (int k = 0; k < kn; ++k) {
    const int64_t first = kc + k - base - q0;  // first lane that sees this key
    const __mmask16 vis = first <= 0 ? __mmask16(0xFFFF) : first >= 16 ? __mmask16(0) : __mmask16(0xFFFFu << first);
    const __m512 x = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(_mm512_load_ps(w.s[k]), scale));
    _mm512_store_ps(w.s[k], x);
    mnew = _mm512_max_ps(mnew, x);
  }
  const __m512 alpha = exp16(_mm512_sub_ps(m, mnew));
  m = mnew;
  l = _mm512_mul_ps(l, alpha);
  for (int r = 0; r < 32; ++r) {
    const int k = 2 * r;
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    if (k < kn) p0 = exp16(_mm512_sub_ps(_mm512_load_ps(w.s[k]), m));
    if (k + 1 < kn) p1 = exp16(_mm512_sub_ps(_mm512_load_ps(w.s[k + 1]), m));
    l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
    _mm512_store_si512(w.p[r], pair_rows((__m256i)_mm512_cvtneps_pbh(p0), (__m256i)_mm512_cvtneps_pbh(p1)));
  }
  return alpha;
}

// O^T / l, back to rows of queries, rounded to bf16.
PDS_AVX512BF16 inline void store_output(const PrefillArgs& a, const Segment& s, int64_t h, int64_t q0, int64_t nq,
                                        __m512 l, TaskScratch& w) {
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l);
  for (int64_t dt = 0; dt < a.D / 16; ++dt) {
    __m512i r[16];
    for (int d = 0; d < 16; ++d) r[d] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(w.o[dt * 16 + d]), inv));
    transpose16x16(r);
    for (int64_t i = 0; i < nq; ++i)
      _mm256_storeu_si256((__m256i*)(a.out + (s.start + q0 + i) * a.ldo + h * a.D + dt * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
  }
}

// The AVX-512 BF16 counterpart of attend_tile: the same layouts, mask, softmax and roundings
// (scores from bf16 products summed in float32, probabilities rounded to bf16 for P . V).
PDS_AVX512BF16 void attend_tile_avx512(const PrefillArgs& a, const Segment& s, int64_t h, int64_t q0, TaskScratch& w) {
  const int64_t D = a.D, kvh = h / (a.H / a.KVH), nq = std::min<int64_t>(16, s.n - q0);
  const int64_t base = s.context - s.n, nk = base + q0 + nq;
  transpose_queries(a, s, h, q0, nq, w);
  for (int64_t d = 0; d < D; ++d) _mm512_store_ps(w.o[d], _mm512_setzero_ps());
  __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
  const bf16* vt = a.vt + s.vt_offset + kvh * D * s.cpad;
  for (int64_t kc = 0; kc < nk; kc += 64) {
    const int kn = int(std::min<int64_t>(64, nk - kc));
    for (int k = 0; k < kn; k += 4) score4(a, s, kvh, kc, k, kn, w);
    const __m512 alpha = softmax_chunk(w, kc, kn, base, q0, a.scale, m, l);
    for (int64_t d0 = 0; d0 < D; d0 += 16) pv16(vt, s.cpad, d0, kc, (kn + 1) / 2, alpha, w);
  }
  store_output(a, s, h, q0, nq, l, w);
}

PDS_AMX void attend_tile(const PrefillArgs& a, const Segment& s, int64_t h, int64_t q0, TaskScratch& w) {
  const int64_t D = a.D, kvh = h / (a.H / a.KVH), nq = std::min<int64_t>(16, s.n - q0);
  const int64_t base = s.context - s.n;      // position of the chunk's first query
  const int64_t nk = base + q0 + nq;         // keys the last query of this tile sees
  const int64_t dsteps = D / 32;
  transpose_queries(a, s, h, q0, nq, w);
  for (int64_t d = 0; d < D; ++d) _mm512_store_ps(w.o[d], _mm512_setzero_ps());
  __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
  const int64_t kstride = a.KVH * D * int64_t(sizeof(bf16));
  const bf16* vt = a.vt + s.vt_offset + kvh * D * s.cpad;
  for (int64_t kc = 0; kc < nk; kc += 64) {
    const int ntiles = int(std::min<int64_t>(4, (nk - kc + 15) / 16));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ds = 0; ds < dsteps; ++ds) {
      _tile_loadd(5, w.qt[ds], 64);
      _tile_loadd(4, token_row(a, s, 0, kvh, kc) + ds * 32, kstride);
      _tile_dpbf16ps(0, 4, 5);
      if (ntiles > 1) {
        _tile_loadd(4, token_row(a, s, 0, kvh, kc + 16) + ds * 32, kstride);
        _tile_dpbf16ps(1, 4, 5);
      }
      if (ntiles > 2) {
        _tile_loadd(4, token_row(a, s, 0, kvh, kc + 32) + ds * 32, kstride);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (ntiles > 3) {
        _tile_loadd(4, token_row(a, s, 0, kvh, kc + 48) + ds * 32, kstride);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, w.s[0], 64);
    _tile_stored(1, w.s[16], 64);
    _tile_stored(2, w.s[32], 64);
    _tile_stored(3, w.s[48], 64);
    const int kn = int(std::min<int64_t>(64, nk - kc));
    const __m512 alpha = softmax_chunk(w, kc, kn, base, q0, a.scale, m, l);
    _tile_loadd(6, w.p[0], 64);
    const bool second = kn > 32;
    if (second) _tile_loadd(7, w.p[16], 64);
    for (int64_t dt = 0; dt < D / 16; ++dt) {
      _tile_zero(0);
      _tile_loadd(4, vt + dt * 16 * s.cpad + kc, s.cpad * int64_t(sizeof(bf16)));
      _tile_dpbf16ps(0, 4, 6);
      if (second) {
        _tile_loadd(4, vt + dt * 16 * s.cpad + kc + 32, s.cpad * int64_t(sizeof(bf16)));
        _tile_dpbf16ps(0, 4, 7);
      }
      _tile_stored(0, w.tmp[0], 64);
      for (int d = 0; d < 16; ++d) {
        float* o = w.o[dt * 16 + d];
        _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), alpha, _mm512_load_ps(w.tmp[d])));
      }
    }
  }
  store_output(a, s, h, q0, nq, l, w);
}

struct Task {
  int32_t seg, head, q0;
  int64_t cost;
};

// Thread lists [t0, t1) of T: list t is tasks t, t + T, t + 2T, ...
PDS_AMX void run_task_lists_amx(const PrefillArgs& a, const std::vector<Segment>& segs, const std::vector<Task>& tasks,
                                int64_t t0, int64_t t1, int64_t T) {
  configure_attention_tiles();  // tile state is per thread
  auto w = std::make_unique<TaskScratch>();
  for (int64_t t = t0; t < t1; ++t)
    for (size_t j = size_t(t); j < tasks.size(); j += size_t(T))
      attend_tile(a, segs[tasks[j].seg], tasks[j].head, tasks[j].q0, *w);
  _tile_release();
}

PDS_AVX512BF16 void run_task_lists_avx512(const PrefillArgs& a, const std::vector<Segment>& segs,
                                          const std::vector<Task>& tasks, int64_t t0, int64_t t1, int64_t T) {
  auto w = std::make_unique<TaskScratch>();
  for (int64_t t = t0; t < t1; ++t)
    for (size_t j = size_t(t); j < tasks.size(); j += size_t(T))
      attend_tile_avx512(a, segs[tasks[j].seg], tasks[j].head, tasks[j].q0, *w);
}

}  // namespace

void paged_prefill_attention(const torch::Tensor& q, const std::vector<int64_t>& starts,
                             const std::vector<int64_t>& ends, const std::vector<int64_t>& context_lens,
                             const std::vector<torch::Tensor>& block_tables, const torch::Tensor& kv_cache,
                             int64_t num_heads, double scale, torch::Tensor& out) {
  TORCH_CHECK(has_avx512bf16(), "paged_prefill_attention: needs AVX-512 BF16 or AMX (kernel ISA ", isa_name(), ")");
  check_cpu(q, "q");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv_cache.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16, "paged_prefill_attention: bf16 only");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(), "paged_prefill_attention: cache layout");
  const int64_t BS = kv_cache.size(2), KVH = kv_cache.size(3), D = kv_cache.size(4), H = num_heads;
  TORCH_CHECK(H % KVH == 0, "paged_prefill_attention: heads not a multiple of kv heads");
  TORCH_CHECK(D % 32 == 0 && D <= 256 && BS % 16 == 0, "paged_prefill_attention: needs head_dim % 32 == 0 (<= 256) and block_size % 16 == 0");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.size(1) >= H * D, "paged_prefill_attention: q must be [T, >= H*D]");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.size(1) == H * D && out.size(0) == q.size(0),
              "paged_prefill_attention: out must be [T, H*D]");
  const size_t S = starts.size();
  TORCH_CHECK(ends.size() == S && context_lens.size() == S && block_tables.size() == S,
              "paged_prefill_attention: one start, end, context length and block table per segment");
  std::vector<torch::Tensor> tables(S);
  std::vector<Segment> segs(S);
  int64_t vt_elems = 0;
  for (size_t i = 0; i < S; ++i) {
    const int64_t n = ends[i] - starts[i], C = context_lens[i];
    TORCH_CHECK(starts[i] >= 0 && n >= 1 && ends[i] <= q.size(0), "paged_prefill_attention: segment rows out of range");
    TORCH_CHECK(C >= n, "paged_prefill_attention: context length ", C, " shorter than the segment's ", n, " queries");
    tables[i] = block_tables[i].contiguous();
    TORCH_CHECK(tables[i].scalar_type() == at::kLong, "paged_prefill_attention: block tables must be int64");
    const int64_t need = (C + BS - 1) / BS;
    TORCH_CHECK(tables[i].numel() >= need, "paged_prefill_attention: block table too short for context length ", C);
    const int64_t* tp = tables[i].data_ptr<int64_t>();
    for (int64_t j = 0; j < need; ++j)
      TORCH_CHECK(tp[j] >= 0 && tp[j] < kv_cache.size(0), "paged_prefill_attention: block id out of range");
    const int64_t cpad = (C + 63) / 64 * 64;
    segs[i] = Segment{starts[i], n, C, tp, vt_elems, cpad};
    vt_elems += KVH * D * cpad;
  }
  std::vector<bf16> vt(size_t(vt_elems) + 32);
  PrefillArgs a{reinterpret_cast<const bf16*>(q.data_ptr()), q.stride(0),
                reinterpret_cast<const bf16*>(kv_cache.data_ptr()), BS, KVH, D, H, float(scale),
                reinterpret_cast<bf16*>(out.data_ptr()), out.stride(0), vt.data()};
  // V^T, 32 keys at a time (zeros up to cpad).
  std::vector<std::array<int64_t, 3>> chunks;
  for (size_t i = 0; i < S; ++i)
    for (int64_t kvh = 0; kvh < KVH; ++kvh)
      for (int64_t k0 = 0; k0 < segs[i].cpad; k0 += 32) chunks.push_back({int64_t(i), kvh, k0});
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) build_vt_chunk(a, segs[chunks[c][0]], chunks[c][1], chunks[c][2]);
  });
  // Tasks dealt round-robin by descending cost (keys seen), one list per thread: causal tiles
  // differ in cost by up to the context length, and equal contiguous ranges would not balance.
  std::vector<Task> tasks;
  for (size_t i = 0; i < S; ++i)
    for (int64_t q0 = 0; q0 < segs[i].n; q0 += 16)
      for (int64_t h = 0; h < H; ++h)
        tasks.push_back({int32_t(i), int32_t(h), int32_t(q0), segs[i].context - segs[i].n + q0 + 16});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(tasks.size())));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    if (kIsa == Isa::kAmx)
      run_task_lists_amx(a, segs, tasks, t0, t1, T);
    else
      run_task_lists_avx512(a, segs, tasks, t0, t1, T);
  });
}

}  // namespace pdk
