// pdserve CPU kernels for the decode step: small-batch GEMV over prepacked weights,
// paged decode attention that reads KV blocks in place, rotary + KV-cache write, fused
// residual-add + RMSNorm and SiLU-and-mul.
//
// The base ISA is AVX2+FMA (every host of this project's kind has it; engine/kernels checks
// before loading). AVX-512 BF16 dot products are chosen at run time where present, for the GEMV
// and decode attention. Threads come from ATen's pool (at::parallel_for), so these
// kernels share torch's OpenMP threads instead of starting a second pool that would spin
// against them. Like torch's own ops they release the GIL while they run, so a worker's asyncio
// thread (token streaming, RPCs) is not held up by the engine thread's forward.
#include "common.h"

using namespace pdk;

namespace {
using nogil = py::call_guard<py::gil_scoped_release>;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pdserve CPU decode kernels";
  m.def("linear_packed", &linear_packed, "small-batch linear over prepacked bf16 weights", py::arg("x"), py::arg("w"),
        py::arg("n"), py::arg("bias") = py::none(), nogil());
  m.def("linear_int4", &linear_int4, "small-batch linear over group-wise 4-bit weights (pack_int4)", py::arg("x"),
        py::arg("w"), py::arg("scales"), py::arg("zeros"), py::arg("n"), py::arg("group"), py::arg("bias") = py::none(),
        nogil());
  m.def("linear_int8", &linear_int8, "small-batch linear over group-wise symmetric int8 weights (pack_int8)",
        py::arg("x"), py::arg("w"), py::arg("scales"), py::arg("n"), py::arg("group"), py::arg("bias") = py::none(),
        nogil());
  m.def("linear_packed_silu", &linear_packed_silu, "silu(x . gate) * (x . up) over an interleaved packed gate_up (AMX)",
        py::arg("x"), py::arg("w"), py::arg("intermediate"), nogil());
  m.def("add_rms_norm", &add_rms_norm, "x += delta (in place); rms_norm(x) * w", py::arg("x"), py::arg("delta"),
        py::arg("weight"), py::arg("eps"), py::arg("out_bf16"), nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I]", nogil());
  m.def("rope_write_kv", &rope_write_kv, "rotary (and qk-norm) in place, k/v into the paged cache", nogil());
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV, read in place", nogil());
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "causal attention of prefill chunks over their paged KV, read in place (AMX or AVX-512 BF16)", py::arg("q"), py::arg("starts"),
        py::arg("ends"), py::arg("context_lens"), py::arg("block_tables"), py::arg("kv_cache"), py::arg("num_heads"),
        py::arg("scale"), py::arg("out"), nogil());
  py::class_<Projection>(m, "Projection")
      .def(py::init([](torch::Tensor w, int64_t n, c10::optional<torch::Tensor> bias, int64_t group,
                       c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> zeros) {
             Projection p;
             p.w = w, p.n = n, p.bias = bias, p.group = group;
             if (group > 0) {
               TORCH_CHECK(scales.has_value() && zeros.has_value(), "Projection: a 4-bit projection needs scales and zeros");
               p.scales = *scales, p.zeros = *zeros;
             }
             return p;
           }),
           py::arg("w"), py::arg("n"), py::arg("bias") = py::none(), py::arg("group") = 0,
           py::arg("scales") = py::none(), py::arg("zeros") = py::none());
  py::class_<DecodeLayerWeights>(m, "DecodeLayerWeights")
      .def(py::init([](Projection qkv, Projection o, Projection gate_up, Projection down, int64_t intermediate,
                       bool fused_silu, torch::Tensor post_norm, double post_eps, c10::optional<torch::Tensor> q_norm,
                       c10::optional<torch::Tensor> k_norm, double qk_eps, int64_t num_heads, int64_t num_kv_heads,
                       double scale, torch::Tensor kv_cache) {
             DecodeLayerWeights w;
             w.qkv = qkv, w.o = o, w.gate_up = gate_up, w.down = down, w.intermediate = intermediate;
             w.fused_silu = fused_silu, w.post_norm = post_norm, w.post_eps = post_eps, w.q_norm = q_norm;
             w.k_norm = k_norm, w.qk_eps = qk_eps, w.num_heads = num_heads, w.num_kv_heads = num_kv_heads;
             w.scale = scale, w.kv_cache = kv_cache;
             return w;
           }),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("intermediate"),
           py::arg("fused_silu"), py::arg("post_norm"), py::arg("post_eps"), py::arg("q_norm"), py::arg("k_norm"),
           py::arg("qk_eps"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("scale"), py::arg("kv_cache"));
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init([](torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, bool interleaved,
                       torch::Tensor slot_blocks, torch::Tensor slot_offsets, torch::Tensor rows,
                       torch::Tensor block_table, torch::Tensor lens) {
             DecodeStep s;
             s.positions = positions, s.cos = cos, s.sin = sin, s.interleaved = interleaved;
             s.slot_blocks = slot_blocks, s.slot_offsets = slot_offsets, s.rows = rows;
             s.block_table = block_table, s.lens = lens;
             return s;
           }),
           py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("interleaved"), py::arg("slot_blocks"),
           py::arg("slot_offsets"), py::arg("rows"), py::arg("block_table"), py::arg("lens"));
  m.def("decode_layer", &decode_layer, "one dense decoder layer for a decode-only batch", py::arg("weights"),
        py::arg("step"), py::arg("x"), py::arg("h"), py::arg("next_norm"), py::arg("next_eps"), py::arg("next_bf16"),
        nogil());
  m.def("refine_logits", &refine_logits, "bf16 logits -> float32, near-ties of each row's maximum re-scored exactly",
        py::arg("logits"), py::arg("hidden"), py::arg("weight"), py::arg("rel_tol"), py::arg("abs_tol") = 0.0, nogil());
  m.def("argmax_rows", &argmax_rows, "torch.argmax of the chosen rows of float32 logits", py::arg("logits"),
        py::arg("rows"), nogil());
  m.def("isa", &isa_name, "the instruction set the GEMV dispatches to");
}

