// Shared device/host helpers for spiel's CUDA kernels: dtype traits and dispatch, 16-byte vectors,
// warp-cooperative lower_bound over sorted index arrays.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
// c10's stream header (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// minimal toolkit may lack); c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream is.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace spiel {

// ---------------------------------------------------------------------------------------------
// Host-side dtype dispatch. Each macro expands `fn` (a lambda taking no arguments) with the alias
// NAME bound to the device type of the tensor's dtype. Nest them to instantiate templates over
// dtype combinations; kernels are written once as templates, never copied per dtype.
// ---------------------------------------------------------------------------------------------
#define SPIEL_DISPATCH_CASE(ENUM, TYPE, NAME, ...) \
  case ENUM: {                                     \
    using NAME = TYPE;                             \
    __VA_ARGS__();                                 \
    break;                                         \
  }

// bf16 / fp16 / fp32 -> __nv_bfloat16 / __half / float
#define SPIEL_DISPATCH_FLOAT(SCALAR_TYPE, NAME, WHAT, ...)                                   \
  [&] {                                                                                      \
    const auto _st = (SCALAR_TYPE);                                                          \
    switch (_st) {                                                                           \
      SPIEL_DISPATCH_CASE(at::ScalarType::Float, float, NAME, __VA_ARGS__)                   \
      SPIEL_DISPATCH_CASE(at::ScalarType::BFloat16, __nv_bfloat16, NAME, __VA_ARGS__)        \
      SPIEL_DISPATCH_CASE(at::ScalarType::Half, __half, NAME, __VA_ARGS__)                   \
      default:                                                                               \
        TORCH_CHECK(false, WHAT, ": unsupported dtype ", _st, " (expected bf16, fp16 or fp32)"); \
    }                                                                                        \
  }()

// int32 / int64
#define SPIEL_DISPATCH_INDEX(SCALAR_TYPE, NAME, WHAT, ...)                              \
  [&] {                                                                                 \
    const auto _st = (SCALAR_TYPE);                                                     \
    switch (_st) {                                                                      \
      SPIEL_DISPATCH_CASE(at::ScalarType::Int, int32_t, NAME, __VA_ARGS__)              \
      SPIEL_DISPATCH_CASE(at::ScalarType::Long, int64_t, NAME, __VA_ARGS__)             \
      default:                                                                          \
        TORCH_CHECK(false, WHAT, ": unsupported index dtype ", _st, " (expected int32 or int64)"); \
    }                                                                                   \
  }()

// int16 / int32 / fp32 step counts
#define SPIEL_DISPATCH_COUNT(SCALAR_TYPE, NAME, WHAT, ...)                                   \
  [&] {                                                                                     \
    const auto _st = (SCALAR_TYPE);                                                         \
    switch (_st) {                                                                          \
      SPIEL_DISPATCH_CASE(at::ScalarType::Short, int16_t, NAME, __VA_ARGS__)                \
      SPIEL_DISPATCH_CASE(at::ScalarType::Int, int32_t, NAME, __VA_ARGS__)                  \
      SPIEL_DISPATCH_CASE(at::ScalarType::Float, float, NAME, __VA_ARGS__)                  \
      default:                                                                              \
        TORCH_CHECK(false, WHAT, ": unsupported step dtype ", _st, " (expected int16, int32 or fp32)"); \
    }                                                                                       \
  }()

// ---------------------------------------------------------------------------------------------
// Conversions (round-to-nearest-even, no fast math: results are bit-exact against torch).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return Cvt<T>::to_float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return Cvt<T>::from_float(x);
}

// 16 bytes of T, loaded/stored as one uint4 (ld/st.global.v4.b32).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Warp-cooperative lower_bound: the first p in [lo, hi] with a[p] >= x (hi if none), for a sorted
// array a. All 32 lanes of the warp must call it with the same arguments. Each round the 32 lanes
// probe 32 positions splitting [lo, hi) into 33 parts, so a search over k entries takes about
// log_33(k) dependent loads (4 for k = 450k) instead of log_2(k) (19).
// ---------------------------------------------------------------------------------------------
template <typename IdxT>
__device__ __forceinline__ int64_t warp_lower_bound(const IdxT* __restrict__ a, int64_t lo, int64_t hi,
                                                    int64_t x) {
  const int lane = threadIdx.x & 31;
  while (hi - lo > 32) {
    const int64_t c = hi - lo;
    const int64_t q = lo + (c * (lane + 1)) / 33;  // strictly increasing in lane, all in [lo, hi)
    const bool pred = static_cast<int64_t>(__ldg(a + q)) < x;
    const int cnt = __popc(__ballot_sync(kFullMask, pred));  // a is sorted: the preds form a prefix
    const int64_t q_below = __shfl_sync(kFullMask, q, cnt > 0 ? cnt - 1 : 0);
    const int64_t q_above = __shfl_sync(kFullMask, q, cnt < 32 ? cnt : 31);
    if (cnt > 0) lo = q_below + 1;
    if (cnt < 32) hi = q_above;
  }
  const int64_t p = lo + lane;
  const bool pred = p < hi && static_cast<int64_t>(__ldg(a + p)) < x;
  return lo + __popc(__ballot_sync(kFullMask, pred));
}

// lower_bound of x in a sorted array of k unique indices into [0, n): at most x entries are < x and at
// most n - x are >= x, which narrows the initial range (helps the first and last chunks).
template <typename IdxT>
__device__ __forceinline__ int64_t warp_lower_bound_unique(const IdxT* __restrict__ a, int64_t k, int64_t n,
                                                           int64_t x) {
  int64_t lo = k - (n - x);
  lo = lo < 0 ? 0 : lo;
  int64_t hi = x < k ? x : k;
  if (lo > hi) lo = hi;  // only for invalid (non-unique / out-of-range) indices; stay in bounds
  return warp_lower_bound(a, lo, hi, x);
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of a device (cached per device: cudaDeviceGetAttribute is not free per launch).
inline int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

// A number for a TORCH_CHECK message, formatted with snprintf. Messages never stream numbers through
// std::ostream: in the extension built on the device (its own host compiler), a check whose message streamed an
// integer crashed the process (SIGSEGV) instead of raising, while string-only messages raised as they should.
template <typename T>
inline std::string msg_num(T value) {
  static_assert(std::is_arithmetic<T>::value, "msg_num formats numbers");
  char buf[40];
  if constexpr (std::is_floating_point<T>::value) {
    std::snprintf(buf, sizeof(buf), "%.17g", static_cast<double>(value));
  } else if constexpr (std::is_signed<T>::value) {
    std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(value));
  } else {
    std::snprintf(buf, sizeof(buf), "%llu", static_cast<unsigned long long>(value));
  }
  return std::string(buf);
}

// Multi-tensor launches: `fill(slot, i)` packs tensor i into slot `slot` of a kernel's parameter block and returns
// its work size (0: nothing to do, the slot stays free); `launch(count, largest)` runs one kernel over the `count`
// filled slots (`largest`: the biggest work size among them). A launch every `capacity` tensors and one at the end.
template <typename Fill, typename Launch>
inline void for_each_tensor_group(size_t n, int capacity, Fill&& fill, Launch&& launch) {
  int count = 0;
  int64_t largest = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t work = fill(count, i);
    if (work == 0) continue;
    largest = work > largest ? work : largest;
    if (++count == capacity) {
      launch(count, largest);
      count = 0;
      largest = 0;
    }
  }
  if (count > 0) launch(count, largest);
}

// Host-side metadata check of the entry points (no sync).
inline void check_cuda_contig(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK(t.is_cuda(), what, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), what, ": ", name, " must be contiguous");
}

}  // namespace spiel
