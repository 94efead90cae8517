// The LM head's output on its way to the sampler: bf16 logits widened to float32 with their
// near-ties re-scored exactly, and greedy argmax over chosen rows. Each is one pass over a row
// where the torch expression takes five (widen, max, compare, nonzero, gather) or a slow
// reduction: at batch 8 on a 49,152-token vocabulary that was ~2 ms of a decode step.
#include "common.h"

namespace pdk {

// logits [B, V] bf16 (the head's output), hidden [B, K] bf16, weight [V, K] bf16 -> float32
// [B, V]: each logit within max(rel_tol * |max|, abs_tol) of its row's maximum is replaced by the float32 dot
// product of its weight row with the hidden row (accumulated in double, rounded once); the rest
// are widened. A row holding NaN is only widened (its comparisons are false, as in torch).
torch::Tensor refine_logits(const torch::Tensor& logits, const torch::Tensor& hidden, const torch::Tensor& weight,
                            double rel_tol, double abs_tol) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && hidden.scalar_type() == at::kBFloat16 &&
                  weight.scalar_type() == at::kBFloat16,
              "refine_logits: bf16 logits, hidden and weight");
  TORCH_CHECK(logits.dim() == 2 && hidden.dim() == 2 && weight.dim() == 2 && logits.size(0) == hidden.size(0) &&
                  logits.size(1) == weight.size(0) && hidden.size(1) == weight.size(1),
              "refine_logits: shapes ", logits.sizes(), ", ", hidden.sizes(), ", ", weight.sizes());
  auto lg = logits.contiguous(), h = hidden.contiguous(), w = weight.contiguous();
  const int64_t B = lg.size(0), V = lg.size(1), K = h.size(1);
  auto out = torch::empty({B, V}, lg.options().dtype(at::kFloat));
  const bf16* lp = reinterpret_cast<const bf16*>(lg.data_ptr());
  const bf16* hp = reinterpret_cast<const bf16*>(h.data_ptr());
  const bf16* wp = reinterpret_cast<const bf16*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  const float tol = float(rel_tol), atol = float(abs_tol);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> hf(static_cast<size_t>(K));
    for (int64_t b = b0; b < b1; ++b) {
      const bf16* lr = lp + b * V;
      float* o = op + b * V;
      float top = -INFINITY;
      bool nan = false;
      for (int64_t v = 0; v < V; ++v) {
        const float f = bf2f(lr[v]);
        o[v] = f;
        nan |= f != f;
        top = f > top ? f : top;
      }
      if (nan) continue;
      const float thr = top - std::max(std::fabs(top) * tol, atol);
      for (int64_t k = 0; k < K; ++k) hf[size_t(k)] = bf2f(hp[b * K + k]);
      for (int64_t v = 0; v < V; ++v) {
        if (!(o[v] >= thr)) continue;
        const bf16* wr = wp + v * K;
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k) s += double(bf2f(wr[k]) * hf[size_t(k)]);
        o[v] = float(s);
      }
    }
  });
  return out;
}

// For each index r in rows: the first position of the maximum of logits[r] (float32 [B, V]),
// or of its first NaN, as torch.argmax answers.
std::vector<int64_t> argmax_rows(const torch::Tensor& logits, const std::vector<int64_t>& rows) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2, "argmax_rows: float32 [B, V] logits");
  auto lg = logits.contiguous();
  const int64_t B = lg.size(0), V = lg.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < B, "argmax_rows: row ", r, " out of range");
  std::vector<int64_t> out(rows.size());
  const float* lp = lg.data_ptr<float>();
  at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* x = lp + rows[size_t(i)] * V;
      int64_t best = 0;
      float bv = x[0];
      if (bv == bv) {
        for (int64_t v = 1; v < V; ++v) {
          const float f = x[v];
          if (f != f) { best = v; break; }
          if (f > bv) bv = f, best = v;
        }
      }
      out[size_t(i)] = best;
    }
  });
  return out;
}

}  // namespace pdk
