// Registers spiel's CUDA kernels as private ops in the `spiel` namespace. The public ops
// (spiel::merge_delta, ...) are declared in Python (spiel/ops/*.py) and dispatch to these when the
// "cuda" backend is selected.
#include <torch/library.h>
#include <torch/extension.h>

#include "spiel.h"

TORCH_LIBRARY_FRAGMENT(spiel, m) {
  m.def("_cuda_merge_delta(Tensor weight, Tensor indices, Tensor values, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_nf4_dequantize_add_delta(Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, int blocksize, Tensor indices, Tensor values, "
      "Tensor(a!) out) -> ()");
  m.def("_cuda_nf4_quantize(Tensor weight, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "_cuda_sddmm(Tensor grad_output, Tensor input, Tensor indices, int out_features, "
      "int in_features, Tensor? plan) -> Tensor");
  m.def(
      "_cuda_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, "
      "float host_count) -> ()");
  m.def("_cuda_select_topk_abs(Tensor x, int k, Tensor? exclude, int exclude_offset) -> (Tensor, Tensor)");
  m.def("_cuda_index_put_many_(Tensor(a!)[] dense, Tensor[] indices, Tensor[] values) -> ()");
  m.def("_cuda_index_select_many(Tensor[] dense, Tensor[] indices, Tensor(a!)[] out) -> ()");
  m.def("_cuda_drop_regrow_indices(Tensor[] values, Tensor[] indices, Tensor regrown) -> (Tensor, Tensor)");
  m.def(
      "_cuda_outer_threshold(Tensor rows, Tensor cols, Tensor keys, Tensor row_start, Tensor need, Tensor hi, "
      "int sections, int rounds) -> Tensor");
}

TORCH_LIBRARY_IMPL(spiel, CUDA, m) {
  m.impl("_cuda_merge_delta", &spiel::merge_delta_cuda);
  m.impl("_cuda_nf4_dequantize_add_delta", &spiel::nf4_dequantize_add_delta_cuda);
  m.impl("_cuda_nf4_quantize", &spiel::nf4_quantize_cuda);
  m.impl("_cuda_sddmm", &spiel::sddmm_cuda);
  m.impl("_cuda_adamw_step_", &spiel::adamw_step_cuda);
  m.impl("_cuda_select_topk_abs", &spiel::select_topk_abs_cuda);
  m.impl("_cuda_index_put_many_", &spiel::index_put_many_cuda);
  m.impl("_cuda_index_select_many", &spiel::index_select_many_cuda);
  m.impl("_cuda_drop_regrow_indices", &spiel::drop_regrow_indices_cuda);
  m.impl("_cuda_outer_threshold", &spiel::outer_threshold_cuda);
}

// `import spiel._C` loads the library (and with it the registrations above). Host-side queries take no
// tensors, so they are plain functions of the module rather than ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spiel CUDA kernels (registered as torch ops)";
  m.def("sddmm_wgmma_available", &spiel::sddmm_wgmma_available, pybind11::arg("device"),
        "Whether sddmm's dense_tile strategy runs the sm90a wgmma kernel on this CUDA device.");
#ifdef SPIEL_BUILD_SM90A
  m.attr("built_sm90a") = true;  // compiled for 9.0a (the wgmma/TMA kernels are in)
#else
  m.attr("built_sm90a") = false;
#endif
}
