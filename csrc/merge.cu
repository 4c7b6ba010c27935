// Forward kernels: fused delta merge, fused NF4 dequantize + delta, NF4 quantize.
//
// Every kernel is one pass over the flat output: CTA b owns the contiguous chunk
// [b * CHUNK, (b + 1) * CHUNK), finds the deltas of its chunk in the sorted index array with two
// warp-cooperative lower_bound searches (warp 0: chunk start, warp 1: chunk end), stages the chunk in
// registers (merge) or shared memory (NF4), adds the chunk's deltas there (indices are unique, so no two
// threads touch the same element: no atomics) and writes every output element exactly once with 16-byte
// stores. The dense loads are issued before the search so the search latency hides under them.
// Each CTA reads its whole chunk before writing it, and writes only its chunk, so out may alias weight.
//
// Semantics (ARCHITECTURE.md, "Kernel contract"):
//   merge:   out[i] = round_T(fp32(w[i]) + fp32(v[j])) if indices[j] == i else w[i]
//   nf4:     out[i] = round_T(fp32(code[q_i] * absmax_f32[i / bs]) + fp32(v[j]))  (no delta: no add)
//            absmax_f32[b] = fp32(fp32(nested_code[absmax_u8[b]] * nested_absmax[b / 256]) + offset)
//   quant:   absmax = max|w| per block; q = #{m : clamp(w * (1 / max(absmax, 1e-38)), -1, 1) > mid_m},
//            mid_m = fp32(code[m] + code[m + 1]) / 2   (the reference's bucketize, right=False)
// All float arithmetic uses explicit _rn intrinsics so nvcc cannot contract it into FMAs: results are
// bit-exact against the PyTorch reference.
#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------------
// merge_delta
// ------------------------------------------------------------------------------------------------
constexpr int kMergeVecs = 4;  // 16-byte vectors per thread: 16 KiB of weight per CTA

template <typename T, typename V, typename I>
__global__ void __launch_bounds__(kThreads)
    merge_delta_kernel(const T* weight, const I* __restrict__ indices, const V* __restrict__ values, T* out,
                       int64_t n, int64_t k, bool vec_ok) {
  // weight and out are not __restrict__: they may alias (in-place merge).
  constexpr int VN = Vec16<T>::N;
  constexpr int CHUNK = kThreads * kMergeVecs * VN;
  __shared__ Vec16<T> s_vec[kThreads * kMergeVecs];
  __shared__ int64_t s_range[2];
  T* s = reinterpret_cast<T*>(s_vec);

  const int tid = threadIdx.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * CHUNK;
  const int len = static_cast<int>(min(static_cast<int64_t>(CHUNK), n - start));
  const bool full = vec_ok && len == CHUNK;

  // 1. dense loads (coalesced: vector tid + i * kThreads), in flight during the search
  Vec16<T> r[kMergeVecs];
  if (full) {
    const Vec16<T>* src = reinterpret_cast<const Vec16<T>*>(weight + start);
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) r[i] = src[tid + i * kThreads];
  } else {
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) {
#pragma unroll
      for (int e = 0; e < VN; ++e) {
        const int idx = (tid + i * kThreads) * VN + e;
        r[i].v[e] = idx < len ? weight[start + idx] : from_float<T>(0.f);
      }
    }
  }

  // 2. this chunk's deltas: [lo, hi) of the sorted indices
  int64_t lo = 0, hi = 0;
  if (k > 0) {
    const int warp = tid >> 5;
    if (warp < 2) {
      const int64_t pos = warp_lower_bound_unique(indices, k, n, start + (warp == 0 ? 0 : len));
      if ((tid & 31) == 0) s_range[warp] = pos;
    }
    __syncthreads();
    lo = s_range[0];
    hi = s_range[1];
  }

  // 3. add the deltas in shared memory (unique indices: one thread per element, no atomics)
  if (hi > lo) {  // uniform across the CTA
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) s_vec[tid + i * kThreads] = r[i];
    __syncthreads();
    for (int64_t j = lo + tid; j < hi; j += kThreads) {
      const uint64_t off = static_cast<uint64_t>(static_cast<int64_t>(__ldg(indices + j)) - start);
      if (off < static_cast<uint64_t>(len)) {  // always true for valid (sorted, unique) indices
        s[off] = from_float<T>(__fadd_rn(to_float(s[off]), to_float(__ldg(values + j))));
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) r[i] = s_vec[tid + i * kThreads];
  }

  // 4. each output element written once
  if (full) {
    Vec16<T>* dst = reinterpret_cast<Vec16<T>*>(out + start);
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) dst[tid + i * kThreads] = r[i];
  } else {
#pragma unroll
    for (int i = 0; i < kMergeVecs; ++i) {
#pragma unroll
      for (int e = 0; e < VN; ++e) {
        const int idx = (tid + i * kThreads) * VN + e;
        if (idx < len) out[start + idx] = r[i].v[e];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// NF4
// ------------------------------------------------------------------------------------------------
__constant__ float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982355384827f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Dequantize: each thread reads 16 packed bytes (one 16-byte load) = 32 elements, all in one absmax
// block (blocksize >= 32). The fp32 products go to shared memory, rows of 32 floats padded to 36 so
// that both the row-wise writes (float4 per thread) and the column-wise reads of the store phase are
// bank-conflict free; the deltas are added there in fp32; then the chunk is written with coalesced
// 16-byte stores (vector tid + i * kThreads).
constexpr int kNf4PerThread = 32;                      // elements per thread (16 packed bytes)
constexpr int kNf4Chunk = kThreads * kNf4PerThread;    // 8192 elements per CTA
constexpr int kNf4Row = 36;                            // padded row stride in floats

__device__ __forceinline__ int nf4_slot(int off) { return (off >> 5) * kNf4Row + (off & 31); }

template <typename T, typename V, typename I, bool kNested>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_add_delta_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax_ptr,
                                    const float* __restrict__ nested_absmax,
                                    const float* __restrict__ nested_code, float nested_offset, int log2_bs,
                                    const I* __restrict__ indices, const V* __restrict__ values,
                                    T* __restrict__ out, int64_t n, int64_t k, bool vec_ok) {
  constexpr int VN = Vec16<T>::N;
  __shared__ __align__(16) float s_val[kThreads * kNf4Row];
  __shared__ float s_code[16];
  __shared__ int64_t s_range[2];

  const int tid = threadIdx.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kNf4Chunk;
  const int len = static_cast<int>(min(static_cast<int64_t>(kNf4Chunk), n - start));  // even
  const bool full = vec_ok && len == kNf4Chunk;

  // 1. packed bytes of elements [start + 32 tid, start + 32 tid + 32) and their block's absmax
  const int my_bytes = max(0, min(16, len / 2 - 16 * tid));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  const int64_t pbase = start / 2 + 16 * tid;
  if (full) {
    const uint4 p = *reinterpret_cast<const uint4*>(packed + pbase);
    w[0] = p.x; w[1] = p.y; w[2] = p.z; w[3] = p.w;
  } else {
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      if (b < my_bytes) w[b >> 2] |= static_cast<uint32_t>(packed[pbase + b]) << (8 * (b & 3));
    }
  }
  float scale = 0.f;
  if (my_bytes > 0) {
    const int64_t blk = (start + kNf4PerThread * tid) >> log2_bs;
    if constexpr (kNested) {
      const uint8_t a = static_cast<const uint8_t*>(absmax_ptr)[blk];
      scale = __fadd_rn(__fmul_rn(__ldg(nested_code + a), __ldg(nested_absmax + (blk >> 8))), nested_offset);
    } else {
      scale = __ldg(static_cast<const float*>(absmax_ptr) + blk);
    }
  }
  if (tid < 16) s_code[tid] = kNF4Code[tid];

  // 2. this chunk's deltas
  if (k > 0) {
    const int warp = tid >> 5;
    if (warp < 2) {
      const int64_t pos = warp_lower_bound_unique(indices, k, n, start + (warp == 0 ? 0 : len));
      if ((tid & 31) == 0) s_range[warp] = pos;
    }
  }
  __syncthreads();

  // 3. decode: fp32 code * absmax into shared memory (row tid)
  float4* row = reinterpret_cast<float4*>(s_val + tid * kNf4Row);
#pragma unroll
  for (int m = 0; m < 8; ++m) {  // float4 m holds elements 4m .. 4m+3 = bytes 2m, 2m+1
    const uint32_t word = w[m >> 1];
    const int sh = 16 * (m & 1);
    const uint32_t b0 = (word >> sh) & 0xffu, b1 = (word >> (sh + 8)) & 0xffu;
    float4 f;
    f.x = __fmul_rn(s_code[b0 >> 4], scale);
    f.y = __fmul_rn(s_code[b0 & 15], scale);
    f.z = __fmul_rn(s_code[b1 >> 4], scale);
    f.w = __fmul_rn(s_code[b1 & 15], scale);
    row[m] = f;
  }
  const int64_t lo = k > 0 ? s_range[0] : 0;
  const int64_t hi = k > 0 ? s_range[1] : 0;
  __syncthreads();

  // 4. deltas, in fp32, one thread per (unique) element
  if (hi > lo) {  // uniform across the CTA
    for (int64_t j = lo + tid; j < hi; j += kThreads) {
      const uint64_t off = static_cast<uint64_t>(static_cast<int64_t>(__ldg(indices + j)) - start);
      if (off < static_cast<uint64_t>(len)) {
        const int slot = nf4_slot(static_cast<int>(off));
        s_val[slot] = __fadd_rn(s_val[slot], to_float(__ldg(values + j)));
      }
    }
    __syncthreads();
  }

  // 5. one rounding to T, coalesced 16-byte stores
  constexpr int kVecs = kNf4Chunk / VN / kThreads;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int e0 = (tid + i * kThreads) * VN;
    const float* src = s_val + nf4_slot(e0);  // VN <= 8 consecutive elements stay in one row
    Vec16<T> o;
#pragma unroll
    for (int q = 0; q < VN; q += 4) {
      const float4 f = *reinterpret_cast<const float4*>(src + q);
      o.v[q] = from_float<T>(f.x);
      o.v[q + 1] = from_float<T>(f.y);
      o.v[q + 2] = from_float<T>(f.z);
      o.v[q + 3] = from_float<T>(f.w);
    }
    if (full) {
      *reinterpret_cast<Vec16<T>*>(out + start + e0) = o;
    } else {
#pragma unroll
      for (int e = 0; e < VN; ++e) {
        if (e0 + e < len) out[start + e0 + e] = o.v[e];
      }
    }
  }
}

// Quantize: each thread owns 16 consecutive elements (a CTA 4096); a block of B elements spans B / 16
// threads: max-reduced with warp shuffles, across warps through shared memory when B > 512.
constexpr int kQPerThread = 16;
constexpr int kQChunk = kThreads * kQPerThread;  // 4096 = the largest blocksize

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nf4_quantize_kernel(const T* __restrict__ weight, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                        int64_t n, int log2_bs, bool vec_ok) {
  constexpr int VN = Vec16<T>::N;
  __shared__ float s_warp_max[kThreads / 32];
  const int tid = threadIdx.x;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kQChunk + kQPerThread * tid;
  const int my = static_cast<int>(max(static_cast<int64_t>(0), min(static_cast<int64_t>(kQPerThread), n - e0)));

  float x[kQPerThread];
  if (vec_ok && my == kQPerThread) {
    const Vec16<T>* src = reinterpret_cast<const Vec16<T>*>(weight + e0);
#pragma unroll
    for (int i = 0; i < kQPerThread / VN; ++i) {
      const Vec16<T> v = src[i];
#pragma unroll
      for (int e = 0; e < VN; ++e) x[i * VN + e] = to_float(v.v[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kQPerThread; ++e) x[e] = e < my ? to_float(weight[e0 + e]) : 0.f;
  }

  float m = 0.f;
#pragma unroll
  for (int e = 0; e < kQPerThread; ++e) m = fmaxf(m, fabsf(x[e]));
  const int group = 1 << (log2_bs - 4);  // threads per quantization block (2 .. 256)
  const int in_warp = group < 32 ? group : 32;
  for (int o = 1; o < in_warp; o <<= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  if (group > 32) {  // uniform
    const int warp = tid >> 5;
    if ((tid & 31) == 0) s_warp_max[warp] = m;
    __syncthreads();
    const int nw = group >> 5;
    const int w0 = (warp / nw) * nw;
    m = s_warp_max[w0];
    for (int i = 1; i < nw; ++i) m = fmaxf(m, s_warp_max[w0 + i]);
  }
  if (my == 0) return;
  if ((tid & (group - 1)) == 0) absmax[e0 >> log2_bs] = m;

  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = __fmul_rn(__fadd_rn(kNF4Code[i], kNF4Code[i + 1]), 0.5f);
  const float inv = __fdiv_rn(1.0f, fmaxf(m, 1e-38f));

  uint32_t q32[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < kQPerThread; ++e) {
    const float s = fminf(fmaxf(__fmul_rn(x[e], inv), -1.0f), 1.0f);
    uint32_t q = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) q += s > mid[i] ? 1u : 0u;
    // element 2p -> high nibble of byte p; bytes little-endian within the words
    const int byte = e >> 1;
    const int shift = 8 * (byte & 3) + ((e & 1) ? 0 : 4);
    q32[byte >> 2] |= q << shift;
  }
  const int64_t p0 = e0 / 2;
  if (vec_ok && my == kQPerThread) {
    *reinterpret_cast<uint2*>(packed + p0) = make_uint2(q32[0], q32[1]);
  } else {
#pragma unroll
    for (int b = 0; b < kQPerThread / 2; ++b) {
      if (2 * b < my) packed[p0 + b] = static_cast<uint8_t>(q32[b >> 2] >> (8 * (b & 3)));
    }
  }
}

int log2_blocksize(int64_t blocksize, const char* what) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, what,
              ": blocksize must be a power of two in 32..4096, got ", msg_num(blocksize));
  int l = 0;
  while ((int64_t{1} << l) < blocksize) ++l;
  return l;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Host entry points (metadata checks only: no host sync)
// ------------------------------------------------------------------------------------------------
void merge_delta_cuda(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                      at::Tensor& out) {
  constexpr const char* what = "spiel::_cuda_merge_delta";
  check_cuda_contig(weight, what, "weight");
  check_cuda_contig(out, what, "out");
  check_cuda_contig(indices, what, "indices");
  check_cuda_contig(values, what, "values");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type() && out.numel() == weight.numel(), what,
              ": out must match weight's dtype and size");
  TORCH_CHECK(values.numel() == indices.numel(), what, ": values and indices must have the same length");
  TORCH_CHECK(out.device() == weight.device() && indices.device() == weight.device() &&
                  values.device() == weight.device(), what, ": all tensors must be on one device");
  const int64_t n = weight.numel();
  const int64_t k = indices.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = is_aligned16(weight.data_ptr()) && is_aligned16(out.data_ptr());
  SPIEL_DISPATCH_FLOAT(weight.scalar_type(), T, what, [&] {
    SPIEL_DISPATCH_FLOAT(values.scalar_type(), V, what, [&] {
      SPIEL_DISPATCH_INDEX(indices.scalar_type(), I, what, [&] {
        constexpr int64_t chunk = int64_t{kThreads} * kMergeVecs * Vec16<T>::N;
        const int64_t grid = ceil_div(n, chunk);
        merge_delta_kernel<T, V, I><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
            static_cast<const T*>(weight.data_ptr()), static_cast<const I*>(indices.data_ptr()),
            static_cast<const V*>(values.data_ptr()), static_cast<T*>(out.data_ptr()), n, k, vec_ok);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void nf4_dequantize_add_delta_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code, double nested_offset,
                                   int64_t blocksize, const at::Tensor& indices, const at::Tensor& values,
                                   at::Tensor& out) {
  constexpr const char* what = "spiel::_cuda_nf4_dequantize_add_delta";
  check_cuda_contig(packed, what, "packed");
  check_cuda_contig(absmax, what, "absmax");
  check_cuda_contig(indices, what, "indices");
  check_cuda_contig(values, what, "values");
  check_cuda_contig(out, what, "out");
  const int log2_bs = log2_blocksize(blocksize, what);
  const int64_t n = out.numel();
  const int64_t k = indices.numel();
  TORCH_CHECK(n % 2 == 0, what, ": an NF4 weight needs an even number of elements, got ", msg_num(n));
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == n / 2, what, ": packed must be uint8 with ",
              msg_num(n / 2), " elements");
  const int64_t nblocks = ceil_div(n, blocksize);
  TORCH_CHECK(absmax.numel() == nblocks, what, ": absmax must have ", msg_num(nblocks), " entries");
  TORCH_CHECK(values.numel() == k, what, ": values and indices must have the same length");
  const bool nested = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(nested || absmax.scalar_type() == at::kFloat, what, ": absmax must be float32 or uint8");
  const float* nested_absmax_ptr = nullptr;
  const float* nested_code_ptr = nullptr;
  if (nested) {
    TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value(), what,
                ": a uint8 absmax needs nested_absmax and nested_code");
    check_cuda_contig(*nested_absmax, what, "nested_absmax");
    check_cuda_contig(*nested_code, what, "nested_code");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_code->scalar_type() == at::kFloat, what,
                ": nested_absmax and nested_code must be float32");
    TORCH_CHECK(nested_code->numel() == 256 && nested_absmax->numel() >= ceil_div(nblocks, 256), what,
                ": nested_code must have 256 entries and nested_absmax ceil(nblocks / 256)");
    nested_absmax_ptr = nested_absmax->data_ptr<float>();
    nested_code_ptr = nested_code->data_ptr<float>();
  }
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = is_aligned16(packed.data_ptr()) && is_aligned16(out.data_ptr());
  const int64_t grid = ceil_div(n, kNf4Chunk);
  SPIEL_DISPATCH_FLOAT(out.scalar_type(), T, what, [&] {
    SPIEL_DISPATCH_FLOAT(values.scalar_type(), V, what, [&] {
      SPIEL_DISPATCH_INDEX(indices.scalar_type(), I, what, [&] {
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
              packed.data_ptr<uint8_t>(), absmax.data_ptr(), nested_absmax_ptr, nested_code_ptr,
              static_cast<float>(nested_offset), log2_bs, static_cast<const I*>(indices.data_ptr()),
              static_cast<const V*>(values.data_ptr()), static_cast<T*>(out.data_ptr()), n, k, vec_ok);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (nested) {
          launch(nf4_dequantize_add_delta_kernel<T, V, I, true>);
        } else {
          launch(nf4_dequantize_add_delta_kernel<T, V, I, false>);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, int64_t blocksize) {
  constexpr const char* what = "spiel::_cuda_nf4_quantize";
  check_cuda_contig(weight, what, "weight");
  const int log2_bs = log2_blocksize(blocksize, what);
  const int64_t n = weight.numel();
  TORCH_CHECK(n % 2 == 0, what, ": an NF4 weight needs an even number of elements, got ", msg_num(n));
  const int64_t nblocks = ceil_div(n, blocksize);
  auto packed = at::empty({n / 2}, weight.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, weight.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = is_aligned16(weight.data_ptr()) && is_aligned16(packed.data_ptr());
  const int64_t grid = ceil_div(n, kQChunk);
  SPIEL_DISPATCH_FLOAT(weight.scalar_type(), T, what, [&] {
    nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        static_cast<const T*>(weight.data_ptr()), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
        log2_bs, vec_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

// ---------------------------------------------------------------------------------------------------------
// index_put_many_ / index_select_many: dense[i].view(-1)[indices[i]] = entries[i] (put) or entries[i] =
// dense[i].view(-1)[indices[i]] (select) for a list of tensors in one launch per kEntryTensors of them. An index
// update of a model trained merged restores, saves and rewrites the entries of every layer's weight: three
// index_put_/index ops per layer (672 launches at 7B, 24 ms of GPU and ~30 us of host each), now three launches.
// Entries are copied as raw bits (any 2-, 4- or 8-byte dtype, the same for dense and entries).
// ---------------------------------------------------------------------------------------------------------
namespace {

constexpr int kEntryThreads = 256;
constexpr int kEntryUnroll = 4;
constexpr int kEntryTensors = 64;
constexpr int64_t kEntryMaxGridX = 65535;

struct EntryTensors {
  void* dense[kEntryTensors];
  const void* indices[kEntryTensors];
  void* entries[kEntryTensors];
  int64_t count[kEntryTensors];  // entries of tensor i
  int64_t numel[kEntryTensors];  // elements of dense[i]
};

template <typename E, typename IdxT, bool PUT>
__global__ void __launch_bounds__(kEntryThreads) entries_many_kernel(const EntryTensors t) {
  const int i = blockIdx.y;
  const int64_t n = t.count[i], numel = t.numel[i];
  E* __restrict__ dense = static_cast<E*>(t.dense[i]);
  const IdxT* __restrict__ indices = static_cast<const IdxT*>(t.indices[i]);
  E* __restrict__ entries = static_cast<E*>(t.entries[i]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEntryThreads * kEntryUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kEntryThreads * kEntryUnroll + threadIdx.x; base < n;
       base += stride) {
    int64_t at[kEntryUnroll];
#pragma unroll
    for (int u = 0; u < kEntryUnroll; ++u) {  // the indices first: kEntryUnroll independent loads in flight
      const int64_t e = base + u * kEntryThreads;
      at[u] = e < n ? static_cast<int64_t>(indices[e]) : -1;
    }
#pragma unroll
    for (int u = 0; u < kEntryUnroll; ++u) {
      const int64_t e = base + u * kEntryThreads;
      // out-of-range indices are skipped (memory safety); the public op validates them
      if (e >= n || at[u] < 0 || at[u] >= numel) continue;
      if constexpr (PUT) {
        dense[at[u]] = entries[e];
      } else {
        entries[e] = dense[at[u]];
      }
    }
  }
}

template <bool PUT>
void entries_many_cuda(at::TensorList dense, at::TensorList indices, at::TensorList entries, const char* what) {
  const size_t n = dense.size();
  TORCH_CHECK(indices.size() == n && entries.size() == n, what,
              ": dense, indices and entries must have the same length");
  if (n == 0) return;
  const auto device = dense[0].device();
  const auto dtype = dense[0].scalar_type();
  const auto index_type = indices[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    check_cuda_contig(dense[i], what, "dense");
    check_cuda_contig(indices[i], what, "indices");
    check_cuda_contig(entries[i], what, "entries");
    TORCH_CHECK(dense[i].device() == device && indices[i].device() == device && entries[i].device() == device, what,
                ": every tensor must be on ", device, " (item ", msg_num(i), ")");
    TORCH_CHECK(dense[i].scalar_type() == dtype && entries[i].scalar_type() == dtype, what,
                ": dense and entries must all have dtype ", dtype, " (item ", msg_num(i), ")");
    TORCH_CHECK(indices[i].scalar_type() == index_type, what, ": indices must all have dtype ", index_type,
                " (item ", msg_num(i), ")");
    TORCH_CHECK(indices[i].numel() == entries[i].numel(), what, ": indices[", msg_num(i), "] and entries[", msg_num(i),
                "] must have as many elements");
  }
  const int elem = static_cast<int>(c10::elementSize(dtype));
  TORCH_CHECK(elem == 2 || elem == 4 || elem == 8, what, ": unsupported dtype ", dtype, " (2, 4 or 8 bytes)");
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto bits) {
    using E = decltype(bits);
    SPIEL_DISPATCH_INDEX(index_type, IdxT, what, [&] {
      EntryTensors pack;
      for_each_tensor_group(
          n, kEntryTensors,
          [&](int slot, size_t i) -> int64_t {
            const int64_t k = indices[i].numel();
            if (k == 0) return 0;
            pack.dense[slot] = dense[i].data_ptr();
            pack.indices[slot] = indices[i].data_ptr();
            pack.entries[slot] = entries[i].data_ptr();
            pack.count[slot] = k;
            pack.numel[slot] = dense[i].numel();
            return k;
          },
          [&](int count, int64_t largest) {
            const int64_t blocks =
                std::min(ceil_div(largest, static_cast<int64_t>(kEntryThreads) * kEntryUnroll), kEntryMaxGridX);
            entries_many_kernel<E, IdxT, PUT>
                <<<dim3(static_cast<unsigned>(blocks), count), kEntryThreads, 0, stream>>>(pack);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  };
  if (elem == 2) {
    run(uint16_t{});
  } else if (elem == 4) {
    run(uint32_t{});
  } else {
    run(uint64_t{});
  }
}

}  // namespace

void index_put_many_cuda(at::TensorList dense, at::TensorList indices, at::TensorList values) {
  entries_many_cuda<true>(dense, indices, values, "spiel::_cuda_index_put_many_");
}

void index_select_many_cuda(at::TensorList dense, at::TensorList indices, at::TensorList out) {
  entries_many_cuda<false>(dense, indices, out, "spiel::_cuda_index_select_many");
}

}  // namespace spiel
