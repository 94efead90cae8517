// Elementwise decode work fused into single passes: residual add + RMSNorm, SiLU-and-mul, and
// rotary (with Qwen3's per-head qk-norm) written back in place plus the KV-cache write.
#include "common.h"

namespace pdk {

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

}  // namespace pdk
