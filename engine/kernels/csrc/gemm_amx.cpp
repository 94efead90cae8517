// The packed linear on AMX tiles (Sapphire Rapids and later). The packed weight layout
// [N/16][K/2][16][2] is already AMX's VNNI layout for the B operand: 16 pairs of one N-tile are a
// 16 x 64-byte tile at stride 64, so weights load straight from the packed copy, and activations
// load straight from x. One TDPBF16PS does 16 rows x 16 outputs x 32 k; the weights are still
// streamed once per call, so up to a few dozen rows cost what one row costs.
#include "common.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace pdk {

namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtiledata = 18;     // the AMX tile data

bool cpu_has_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx & (1u << 24)) && (edx & (1u << 22));  // AMX-TILE, AMX-BF16
}

// Tiles 0-3 accumulate C (row block r, N-tile j at 2r + j), 4-5 hold A for the two row blocks,
// 6-7 hold B for the two N-tiles.
PDS_AMX void configure(int m0, int m1) {
  AmxTileConfig c;
  for (int t : {0, 1}) c.rows[t] = uint8_t(m0), c.colsb[t] = 64;
  c.rows[4] = uint8_t(m0), c.colsb[4] = 64;
  c.rows[6] = c.rows[7] = 16, c.colsb[6] = c.colsb[7] = 64;
  if (m1 > 0) {
    for (int t : {2, 3}) c.rows[t] = uint8_t(m1), c.colsb[t] = 64;
    c.rows[5] = uint8_t(m1), c.colsb[5] = 64;
  }
  _tile_loadconfig(&c);
}

// y rows [r0, r0 + m) of N-tile t from a C tile stored at `s` (16 floats per row), plus bias.
PDS_AMX void write_rows(const PackedArgs& a, const float* s, int64_t r0, int m, int64_t t) {
  const int64_t n0 = t * 16;
  const int64_t valid = std::min<int64_t>(16, a.N - n0);
  const __mmask16 mask = __mmask16((1u << valid) - 1u);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < m; ++r) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(s + r * 16), bias));
    _mm256_mask_storeu_epi16(a.y + (r0 + r) * a.ldy + n0, mask, (__m256i)h);
  }
}

// silu(gate) * up for rows [r0, r0 + m) of output tile j, from the C tiles of gate tile 2j (at
// `g`) and up tile 2j + 1 (at `u`) of an interleaved gate_up weight: computed on the float32 sums,
// rounded once.
PDS_AMX void write_silu_rows(const PackedArgs& a, const float* g, const float* u, int64_t r0, int m, int64_t j) {
  const int64_t n0 = j * 16;
  const __mmask16 mask = __mmask16((1u << std::min<int64_t>(16, a.ldy - n0)) - 1u);
  for (int r = 0; r < m; ++r) {
    const __m512 gv = _mm512_loadu_ps(g + r * 16);
    const __m512 uv = _mm512_loadu_ps(u + r * 16);
    const __m512 ex = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    // gate * sigmoid(gate): a division here cost as much as the GEMM's tile work for prefill.
    const __m512 y = _mm512_mul_ps(_mm512_mul_ps(gv, recip16(_mm512_add_ps(_mm512_set1_ps(1.0f), ex))), uv);
    _mm256_mask_storeu_epi16(a.y + (r0 + r) * a.ldy + n0, mask, (__m256i)_mm512_cvtneps_pbh(y));
  }
}

// Rows [r0, r0 + m0 + m1) (m0 <= 16 in tiles 4/0/1, m1 <= 16 in 5/2/3) against N-tiles t and, when
// TWO, t + 1: the whole K in 32-wide steps, then the results out.
template <bool R1, bool TWO, bool SILU>
PDS_AMX void block(const PackedArgs& a, int64_t t, int64_t r0, int m0, int m1, const char* pf, int64_t pf_step,
                   float* s) {
  _tile_zero(0);
  if (TWO) _tile_zero(1);
  if (R1) {
    _tile_zero(2);
    if (TWO) _tile_zero(3);
  }
  const int64_t KP = a.K / 2;
  const bf16* w0 = a.w + t * KP * 32;
  const bf16* w1 = w0 + KP * 32;
  const bf16* x0 = a.x + r0 * a.ldx;
  const bf16* x1 = x0 + 16 * a.ldx;
  const int64_t xs = a.ldx * int64_t(sizeof(bf16));
  for (int64_t k = 0; k < a.K; k += 32) {
    // A share of the next tiles' weights, fetched while these compute: spread over every k-step
    // of every row group, so the misses stay within what the core can keep in flight.
    // others find this pair in cache), so that memory and the tile unit overlap.
    if (pf != nullptr)
      for (int64_t l = 0; l < pf_step; l += 64) _mm_prefetch(pf + (k / 32) * pf_step + l, _MM_HINT_T1);
    // Pair k/2 of a tile starts at element (k/2) * 32.
    _tile_loadd(6, w0 + k * 16, 64);
    if (TWO) _tile_loadd(7, w1 + k * 16, 64);
    _tile_loadd(4, x0 + k, xs);
    _tile_dpbf16ps(0, 4, 6);
    if (TWO) _tile_dpbf16ps(1, 4, 7);
    if (R1) {
      _tile_loadd(5, x1 + k, xs);
      _tile_dpbf16ps(2, 5, 6);
      if (TWO) _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (SILU) {  // tiles t (gate) and t + 1 (up) give output tile t / 2
    float* u = s + 256;
    _tile_stored(0, s, 64);
    _tile_stored(1, u, 64);
    write_silu_rows(a, s, u, r0, m0, t / 2);
    if (R1) {
      _tile_stored(2, s, 64);
      _tile_stored(3, u, 64);
      write_silu_rows(a, s, u, r0 + 16, m1, t / 2);
    }
    return;
  }
  _tile_stored(0, s, 64);
  write_rows(a, s, r0, m0, t);
  if (TWO) {
    _tile_stored(1, s, 64);
    write_rows(a, s, r0, m0, t + 1);
  }
  if (R1) {
    _tile_stored(2, s, 64);
    write_rows(a, s, r0 + 16, m1, t);
    if (TWO) {
      _tile_stored(3, s, 64);
      write_rows(a, s, r0 + 16, m1, t + 1);
    }
  }
}

template <bool SILU>
PDS_AMX inline void block_at(const PackedArgs& a, int64_t t, int64_t t1, int64_t r, int m0, int m1, const char* pf,
                             int64_t pf_step, float* s) {
  const bool two = t + 1 < t1;
  if (m1 > 0) {
    two ? block<true, true, SILU>(a, t, r, m0, m1, pf, pf_step, s)
        : block<true, false, false>(a, t, r, m0, m1, pf, pf_step, s);
  } else {
    two ? block<false, true, SILU>(a, t, r, m0, m1, pf, pf_step, s)
        : block<false, false, false>(a, t, r, m0, m1, pf, pf_step, s);
  }
}

template <bool SILU>
PDS_AMX void blocks(const PackedArgs& a, int64_t t0, int64_t t1, int64_t r_begin, int64_t r_end, int m0, int m1,
                    float* s) {
  // N-tile pairs outermost: a pair's weights (2 x K x 32 bytes) come from memory once and serve
  // every row group from cache. (Row groups outermost, with the pairs in L2-sized chunks, measured
  // 15-20% slower for 256-512 rows.)
  const int64_t KP = a.K / 2, ksteps = a.K / 32;
  const int64_t groups = (r_end - r_begin + 31) / 32;
  const int64_t pair_bytes = 2 * a.K * 32;
  const int64_t pf_step = (pair_bytes / (groups * ksteps) + 63) / 64 * 64;  // bytes per k-step
  for (int64_t t = t0; t < t1; t += 2) {
    // Tiles t+2 and t+3 follow t+1 contiguously: prefetched in equal shares by every k-step.
    const char* next = t + 2 < t1 ? reinterpret_cast<const char*>(a.w + (t + 2) * KP * 32) : nullptr;
    for (int64_t r = r_begin, gi = 0; r < r_end; r += 32, ++gi)
      block_at<SILU>(a, t, t1, r, m0, m1, next ? next + gi * ksteps * pf_step : nullptr, pf_step, s);
  }
}

}  // namespace

bool amx_usable() {
  static const bool ok = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

PDS_AMX void amx_packed_range(const PackedArgs& a, int64_t t0, int64_t t1, bool silu) {
  alignas(64) float s[2 * 16 * 16];
  // Whole 32-row groups under one tile shape, then the remainder under its own: the tile
  // configuration is per thread and reloading it costs, so each shape is loaded once.
  const int64_t full = a.B / 32 * 32;
  if (full > 0) {
    configure(16, 16);
    silu ? blocks<true>(a, t0, t1, 0, full, 16, 16, s) : blocks<false>(a, t0, t1, 0, full, 16, 16, s);
  }
  const int64_t rest = a.B - full;
  if (rest > 0) {
    const int m0 = int(std::min<int64_t>(16, rest));
    const int m1 = int(rest - m0);
    configure(m0, m1);
    silu ? blocks<true>(a, t0, t1, full, a.B, m0, m1, s) : blocks<false>(a, t0, t1, full, a.B, m0, m1, s);
  }
  _tile_release();
}

}  // namespace pdk
