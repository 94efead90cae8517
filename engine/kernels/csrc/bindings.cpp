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
  m.def("linear_packed_silu", &linear_packed_silu, "silu(x . gate) * (x . up) over an interleaved packed gate_up (AMX)",
        py::arg("x"), py::arg("w"), py::arg("intermediate"), nogil());
  m.def("add_rms_norm", &add_rms_norm, "x += delta (in place); rms_norm(x) * w", py::arg("x"), py::arg("delta"),
        py::arg("weight"), py::arg("eps"), py::arg("out_bf16"), nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I]", nogil());
  m.def("rope_write_kv", &rope_write_kv, "rotary (and qk-norm) in place, k/v into the paged cache", nogil());
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV, read in place", nogil());
  m.def("isa", &isa_name, "the instruction set the GEMV dispatches to");
}

