// A whole dense decoder layer for a decode-only batch, as one call: qkv projection, rotary and
// KV write, paged attention, output projection, residual + norm, gated MLP, residual + the next
// norm. The same kernels the per-op path calls, in the same order with the same roundings, so
// the results are identical; what it saves is the ~10 Python-level calls, module lookups and
// argument checks per layer that cost a batch-1 decode step a few milliseconds.
#include "common.h"

namespace pdk {

torch::Tensor Projection::operator()(const torch::Tensor& x) const {
  return group > 0 ? linear_int4(x, w, scales, zeros, n, group, bias) : linear_packed(x, w, n, bias);
}

torch::Tensor decode_layer(const DecodeLayerWeights& w, const DecodeStep& s, torch::Tensor& x, const torch::Tensor& h,
                           const torch::Tensor& next_norm, double next_eps, bool next_bf16) {
  auto qkv = w.qkv(h);
  torch::Tensor cache = w.kv_cache;
  rope_write_kv(qkv, s.positions, s.cos, s.sin, s.interleaved, w.num_heads, w.num_kv_heads, cache, s.slot_blocks,
                s.slot_offsets, w.q_norm, w.k_norm, w.qk_eps);
  auto attn = torch::empty({qkv.size(0), w.num_heads * cache.size(4)}, qkv.options());
  paged_decode_attention(qkv, s.rows, cache, s.block_table, s.lens, w.num_heads, w.scale, attn);
  auto h2 = add_rms_norm(x, w.o(attn), w.post_norm, w.post_eps, true);
  auto m = w.fused_silu ? linear_packed_silu(h2, w.gate_up.w, w.intermediate) : silu_mul(w.gate_up(h2));
  return add_rms_norm(x, w.down(m), next_norm, next_eps, next_bf16);
}

}  // namespace pdk
