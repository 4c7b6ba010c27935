// Fused AdamW with per-slot step counts (spiel::adamw_step_, backend "cuda").
//
// One launch per 48 tensors (multi-tensor apply): the tensors' addresses and sizes travel in the kernel's
// parameter block (2.3 KiB, under the 4 KiB every CUDA version accepts), so there is no table to upload and no
// host sync. Grid: (blocks of the largest tensor, tensors); CTA (b, i) walks tensor i's elements from
// b * kElemsPerCta with a grid stride, kUnroll independent elements per thread in flight. Every element is
// read once and written once (32 B per fp32 delta with fp32 moments and int16 counts).
//
// Math per element, fp32 (spiel/ops/adamw.py has the contract):
//   t = min(t, limit - 1) + 1;  p *= decay;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2
//   p -= lr * m / ((sqrt(v) / sqrt(1 - b2^t) + eps) * (1 - b1^t))          (p kept when lr == 0)
// with b^t = exp2(t log2 b): IEEE sqrt/div (_rn intrinsics), exp2f without fast math.
#include <cmath>

#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kElemsPerCta = kThreads * kUnroll;
constexpr int kMaxTensors = 48;
constexpr int64_t kMaxGridX = 65535;  // CTAs per tensor: larger tensors are walked with a grid stride

struct AdamWTensors {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  void* step[kMaxTensors];
  int64_t numel[kMaxTensors];
};

struct AdamWHyper {
  float lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay, last_count, host_count;
  bool maximize;
};

template <typename P, typename M, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWTensors tensors, const AdamWHyper h) {
  const int i = blockIdx.y;
  const int64_t n = tensors.numel[i];
  P* __restrict__ param = static_cast<P*>(tensors.param[i]);
  const P* __restrict__ grad = static_cast<const P*>(tensors.grad[i]);
  M* __restrict__ exp_avg = static_cast<M*>(tensors.exp_avg[i]);
  M* __restrict__ exp_avg_sq = static_cast<M*>(tensors.exp_avg_sq[i]);
  S* __restrict__ step = static_cast<S*>(tensors.step[i]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemsPerCta;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kElemsPerCta + threadIdx.x; base < n; base += stride) {
    float g[kUnroll], m[kUnroll], v[kUnroll], t[kUnroll], p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll x 5 independent loads in flight
      const int64_t e = base + u * kThreads;
      if (e < n) {
        g[u] = to_float(grad[e]);
        m[u] = to_float(exp_avg[e]);
        v[u] = to_float(exp_avg_sq[e]);
        t[u] = step != nullptr ? static_cast<float>(step[e]) : h.host_count;
        p[u] = to_float(param[e]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + u * kThreads;
      if (e < n) {
        const float gu = h.maximize ? -g[u] : g[u];
        const float tu = __fadd_rn(fminf(t[u], h.last_count), 1.f);
        const float mu = __fadd_rn(m[u], __fmul_rn(h.one_minus_beta1, __fsub_rn(gu, m[u])));
        const float vu = __fadd_rn(__fmul_rn(v[u], h.beta2), __fmul_rn(h.one_minus_beta2, __fmul_rn(gu, gu)));
        float pu = __fmul_rn(p[u], h.decay);
        if (h.lr != 0.f) {
          const float bias1 = __fsub_rn(1.f, exp2f(__fmul_rn(tu, h.log2_beta1)));
          const float bias2 = __fsub_rn(1.f, exp2f(__fmul_rn(tu, h.log2_beta2)));
          const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vu), __fsqrt_rn(bias2)), h.eps);
          pu = __fsub_rn(pu, __fmul_rn(h.lr, __fdiv_rn(mu, __fmul_rn(denom, bias1))));
        }
        param[e] = from_float<P>(pu);
        exp_avg[e] = from_float<M>(mu);
        exp_avg_sq[e] = from_float<M>(vu);
        if (step != nullptr) step[e] = static_cast<S>(tu);  // integer-valued, within S (saturated above)
      }
    }
  }
}

}  // namespace

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool maximize, double host_count) {
  constexpr const char* what = "spiel::_cuda_adamw_step_";
  const size_t n = params.size();
  // an empty steps list: one count (host_count) for every tensor, not written (the caller increments it)
  const bool per_slot = !steps.empty();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && (steps.size() == n || !per_slot),
              what, ": params, grads, exp_avgs, exp_avg_sqs and steps (or no steps) must have the same length");
  TORCH_CHECK(per_slot || (host_count >= 0.0 && host_count <= 16777216.0 && host_count == std::floor(host_count)),
              what, ": host_count must be an integer count in [0, 2**24], got ", msg_num(host_count));
  if (n == 0) return;
  const auto p_type = params[0].scalar_type();
  const auto m_type = exp_avgs[0].scalar_type();
  const auto s_type = per_slot ? steps[0].scalar_type() : at::ScalarType::Float;
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* list[5] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], per_slot ? &steps[i] : nullptr};
    const char* names[5] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps"};
    const at::ScalarType types[5] = {p_type, p_type, m_type, m_type, s_type};
    for (int j = 0; j < (per_slot ? 5 : 4); ++j) {
      check_cuda_contig(*list[j], what, names[j]);
      TORCH_CHECK(list[j]->device() == device, what, ": ", names[j], "[", msg_num(i), "] is on ", list[j]->device(),
                  ", params[0] on ", device);
      TORCH_CHECK(list[j]->scalar_type() == types[j], what, ": ", names[j], "[", msg_num(i), "] has dtype ",
                  list[j]->scalar_type(), ", expected ", types[j]);
      TORCH_CHECK(list[j]->numel() == params[i].numel(), what, ": ", names[j], "[", msg_num(i),
                  "] must have as many elements as params[", msg_num(i), "]");
    }
  }
  AdamWHyper h;
  h.lr = static_cast<float>(lr);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.log2_beta1 = beta1 > 0.0 ? static_cast<float>(std::log2(beta1)) : -INFINITY;
  h.log2_beta2 = beta2 > 0.0 ? static_cast<float>(std::log2(beta2)) : -INFINITY;
  h.eps = static_cast<float>(eps);
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  // adamw_step_limit(dtype) - 1 of spiel/ops/adamw.py: int16 counts saturate at 32767, others at 2**24
  h.last_count = s_type == at::ScalarType::Short ? 32766.f : 16777215.f;
  h.host_count = static_cast<float>(host_count);
  h.maximize = maximize;
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SPIEL_DISPATCH_FLOAT(p_type, P, what, [&] {
    SPIEL_DISPATCH_FLOAT(m_type, M, what, [&] {
      SPIEL_DISPATCH_COUNT(s_type, S, what, [&] {
        AdamWTensors pack;
        for_each_tensor_group(
            n, kMaxTensors,
            [&](int slot, size_t i) -> int64_t {
              const int64_t numel = params[i].numel();
              if (numel == 0) return 0;
              pack.param[slot] = params[i].data_ptr();
              pack.grad[slot] = grads[i].data_ptr();
              pack.exp_avg[slot] = exp_avgs[i].data_ptr();
              pack.exp_avg_sq[slot] = exp_avg_sqs[i].data_ptr();
              pack.step[slot] = per_slot ? steps[i].data_ptr() : nullptr;
              pack.numel[slot] = numel;
              return numel;
            },
            [&](int count, int64_t largest) {
              const int64_t blocks = std::min(ceil_div(largest, static_cast<int64_t>(kElemsPerCta)), kMaxGridX);
              adamw_kernel<P, M, S><<<dim3(static_cast<unsigned>(blocks), count), kThreads, 0, stream>>>(pack, h);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
    });
  });
}

}  // namespace spiel
