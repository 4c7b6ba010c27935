// Declarations of spiel's CUDA entry points. Each is registered in bindings.cpp as a private op
// `spiel::_cuda_<name>` for the CUDA dispatch key; spiel/ops/backends/cuda.py plugs them into the
// Python dispatch. Arguments arrive validated (see ARCHITECTURE.md, "Kernel contract").
#pragma once
#include <optional>
#include <tuple>
#include <ATen/ATen.h>

namespace spiel {

// out.flat[i] = weight.flat[i] + values[j] where indices[j] == i (fp32 add, one rounding).
void merge_delta_cuda(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                      at::Tensor& out);

// out = NF4-dequantize(packed, absmax[, nested]) + scatter(indices, values), in one pass.
void nf4_dequantize_add_delta_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code, double nested_offset,
                                   int64_t blocksize, const at::Tensor& indices,
                                   const at::Tensor& values, at::Tensor& out);

// Blockwise NF4 quantization (bitsandbytes layout): returns (packed uint8 [n/2], absmax fp32 [nblocks]).
std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, int64_t blocksize);

// result[j] = sum_t grad_output[t, r_j] * input[t, c_j] (fp32), r_j/c_j from indices[j].
at::Tensor sddmm_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                      int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& plan);

// Whether the sddmm dense_tile strategy runs the sm90a wgmma kernel on `device` (a compute capability 9.0 GPU
// and an extension built for 9.0a); otherwise it runs the portable WMMA kernel.
bool sddmm_wgmma_available(int64_t device);

// One AdamW step over lists of tensors with per-slot step counts (spiel/ops/adamw.py has the math); an empty
// steps list means one count for every tensor, host_count (read only: the caller increments it).
void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool maximize, double host_count);

// The k largest |x| (NaN as 0; positions in exclude - exclude_offset rank below all others; ties by the
// smaller position) as (ascending int64 positions [k], their fp32 |x| [k]): radix select, no host sync.
std::tuple<at::Tensor, at::Tensor> select_topk_abs_cuda(const at::Tensor& x, int64_t k,
                                                        const std::optional<at::Tensor>& exclude,
                                                        int64_t exclude_offset);

// dense[i].view(-1)[indices[i]] = values[i] for every i (index_put_many_), or out[i] = dense[i].view(-1)[indices[i]]
// (index_select_many): one launch per 64 tensors; dense and values/out share one 2-, 4- or 8-byte dtype, indices
// int32 or int64 (one dtype), out-of-range indices skipped.
void index_put_many_cuda(at::TensorList dense, at::TensorList indices, at::TensorList values);
void index_select_many_cuda(at::TensorList dense, at::TensorList indices, at::TensorList out);

// An index update's drop + regrow for L rows of k (spiel/ops/replace.py has the contract): the n smallest |values[i]|
// leave (ties: the larger position), regrown[i] comes in. Returns (new indices [L, k] in indices' dtype, ascending;
// order [L, k] int64: old slot of each new slot, -1 where regrown). Radix select + one merge pass, no host sync.
std::tuple<at::Tensor, at::Tensor> drop_regrow_indices_cuda(at::TensorList values, at::TensorList indices,
                                                            const at::Tensor& regrown);

// The threshold multisection of SpIEL-MA's batched regrowth (spiel/ops/outer.py has the contract): `rounds`
// rounds of `sections` thresholds per layer, one launch per round; returns lo float64 [L]. No host sync.
at::Tensor outer_threshold_cuda(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& keys,
                                const at::Tensor& row_start, const at::Tensor& need, const at::Tensor& hi,
                                int64_t sections, int64_t rounds);

}  // namespace spiel
