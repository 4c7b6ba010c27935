// Exact top-k of |x| as a set (spiel::select_topk_abs, backend "cuda"): the SpIEL-AG probe's choice of the
// k largest weight-gradient entries of a layer, 16.7M-67M entries per call.
//
// Order: key(x) = bits(fp32 |x|) + 1 (NaN as 0) orders magnitudes as unsigned ints; an excluded position
// (in `exclude`, shifted by `exclude_offset`) has key 0, below every other; equal keys rank by the smaller
// position. The answer is the k positions of largest (key, -position), written in ascending position order
// with their |x| (-inf for an excluded one, returned only when fewer than k others exist).
//
// Schedule (each pass streams x once; no host sync, no sort: one memset and five kernels; for bf16 / fp16 x the
// third histogram pass returns at once unless the k-th key is 0 or 1, see hist_kernel):
//   hist<0..2>  radix select over 11 + 11 + 10 bits of the key: a shared-memory histogram per CTA of the keys
//               whose higher bits match the prefix chosen so far (each CTA also moves the excluded entries of
//               its share of `exclude` from their key's bin to key 0's), merged into a global histogram; the
//               last CTA to finish picks the bin that holds the k-th key. After pass 2 the prefix is the k-th
//               key T: `above` entries have a larger key and `need` = k - above of those equal to T are taken,
//               the first by position.
//   count       per warp-contiguous range: entries with key > T and key == T (the warp's excluded entries
//               marked in a shared-memory bitmap per 8192-entry segment); per-warp and per-CTA totals.
//   write       the same warp ranges again: each CTA sums the totals of the CTAs before it; ballots give each
//               chosen entry its output slot.
// Integer atomics only, so the answer and every count are deterministic.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;      // independent loads in flight per thread of the histogram passes
constexpr int kWarpUnroll = 8;  // the same per lane of count/write (each warp walks its own range); even
static_assert(kWarpUnroll % 2 == 0, "load_keys pairs the loads of 16-bit entries");
constexpr int kSegment = 8192;  // entries per exclusion bitmap of a warp in count/write (1 KiB of shared memory)
constexpr int kSegmentWords = kSegment / 32;
constexpr int kMaxBins = 2048;
// workspace (int32): the global histogram, the select state, then (above, ties) per warp of count/write
constexpr int kCounter = kMaxBins;        // CTAs done with the current pass
constexpr int kPrefix = kMaxBins + 1;     // key bits fixed so far (the k-th key T after pass 2)
constexpr int kRemaining = kMaxBins + 2;  // how many of the entries matching the prefix are still to take
constexpr int kAbove = kMaxBins + 3;      // entries whose key is above every key matching the prefix
constexpr int kCounts = kMaxBins + 8;    // then (above, ties) per CTA of count/write, then per warp

__host__ __device__ constexpr int pass_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__host__ __device__ constexpr int pass_bits(int pass) { return pass == 2 ? 10 : 11; }

template <typename T>
__device__ __forceinline__ uint32_t key_of(T v) {
  const float f = to_float(v);
  return isnan(f) ? 1u : __float_as_uint(fabsf(f)) + 1u;  // at most 0x7f800001 (inf): bit 31 stays 0
}

__device__ __forceinline__ float magnitude_of(uint32_t key) {
  return key == 0 ? -INFINITY : __uint_as_float(key - 1u);
}

// The last CTA of a pass picks the bin of the k-th key among those matching the prefix (bins scanned from the
// top) and resets the histogram and the CTA counter for the next pass.
template <int PASS>
__device__ void pick_bin(int* __restrict__ ws, int k) {
  constexpr int shift = pass_shift(PASS), bins = 1 << pass_bits(PASS), per_thread = bins / kThreads;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int remaining = PASS == 0 ? k : __ldcg(ws + kRemaining);
  int counts[per_thread];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < per_thread; ++j) {  // thread t holds bins bins-1-t*per_thread-j: descending keys
    counts[j] = __ldcg(ws + (bins - 1 - threadIdx.x * per_thread - j));
    sum += counts[j];
  }
  int before;
  Scan(scan_storage).ExclusiveSum(sum, before);
#pragma unroll
  for (int j = 0; j < per_thread; ++j) {
    if (before < remaining && remaining <= before + counts[j]) {  // exactly one bin holds the k-th key
      const int bin = bins - 1 - threadIdx.x * per_thread - j;
      const int prefix = PASS == 0 ? 0 : __ldcg(ws + kPrefix);
      const int above = PASS == 0 ? 0 : __ldcg(ws + kAbove);
      ws[kPrefix] = prefix | (bin << shift);
      ws[kRemaining] = remaining - before;
      ws[kAbove] = above + before;
    }
    before += counts[j];
  }
  __syncthreads();  // every thread has read its bins before they are cleared
  for (int i = threadIdx.x; i < kMaxBins; i += kThreads) ws[i] = 0;
  if (threadIdx.x == 0) ws[kCounter] = 0;
}

// Whether this CTA is the last of the grid to arrive (after its global writes are visible).
__device__ __forceinline__ bool last_to_arrive(int* __restrict__ ws) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ws + kCounter, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

template <typename T, typename IdxT, int PASS>
__global__ void __launch_bounds__(kThreads) hist_kernel(const T* __restrict__ x, int64_t n,
                                                       const IdxT* __restrict__ exclude, int64_t n_excl,
                                                       int64_t exclude_offset, int k, int* __restrict__ ws) {
  constexpr int shift = pass_shift(PASS), bins = 1 << pass_bits(PASS), high = shift + pass_bits(PASS);
  __shared__ int hist[bins];
  const uint32_t prefix = PASS == 0 ? 0u : static_cast<uint32_t>(ws[kPrefix]);
  if constexpr (PASS == 2 && sizeof(T) == 2) {
    // bf16 / fp16 values have at most 11 significant bits, so their keys end in 0...01 (bits 0-12): past key 1
    // every key that matches the prefix of passes 0-1 (bits 10-31) has bits 0-9 equal to 1, and this pass would
    // find them all in bin 1. Keys 0 (excluded) and 1 (zero or NaN) differ only in bit 0: then the pass runs. CTAs read prefix bits 10-31 only,
    // so block 0 setting bit 0 cannot change another CTA's decision; k, above and remaining stay as they are.
    if ((prefix >> 10) != 0) {
      if (blockIdx.x == 0 && threadIdx.x == 0) ws[kPrefix] = static_cast<int>(prefix | 1u);
      return;
    }
  }
  for (int i = threadIdx.x; i < bins; i += kThreads) hist[i] = 0;
  __syncthreads();
  auto matches = [&](uint32_t key) {
    if constexpr (PASS == 0) {
      return true;  // (high is 32 here: no shift)
    } else {
      return (key >> high) == (prefix >> high);
    }
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll; base < n; base += stride) {
    uint32_t keys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      keys[u] = i < n ? key_of(x[i]) : 0u;  // 0: no entry (never matches past pass 0, skipped below)
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool take = base + u * kThreads + threadIdx.x < n && matches(keys[u]);
      const uint32_t bin = (keys[u] >> shift) & (bins - 1);
      // plain shared atomics, even in pass 0 where most entries fall in a few exponent bins: aggregating
      // equal bins per warp with __match_any_sync measured 2.4x slower (0.206 vs 0.086 ms at 45M entries)
      if (take) atomicAdd(hist + bin, 1);
    }
  }
  // this CTA's share of the exclude list: each excluded entry moves from its key's bin to key 0's
  const int64_t share = ceil_div(n_excl, static_cast<int64_t>(gridDim.x));
  const int64_t e_end = min(n_excl, (blockIdx.x + 1) * share);
  for (int64_t e = blockIdx.x * share + threadIdx.x; e < e_end; e += kThreads) {
    const int64_t pos = static_cast<int64_t>(exclude[e]) - exclude_offset;
    if (pos < 0 || pos >= n) continue;
    const uint32_t key = key_of(x[pos]);
    if (matches(key)) atomicSub(hist + ((key >> shift) & (bins - 1)), 1);
    if (matches(0u)) atomicAdd(hist + 0, 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += kThreads)
    if (hist[i] != 0) atomicAdd(ws + i, hist[i]);  // net counts (may be negative for a CTA, never in total)
  if (last_to_arrive(ws)) pick_bin<PASS>(ws, k);
}

__device__ __forceinline__ uint32_t key_of_bits(uint16_t bits, __nv_bfloat16*) {
  return key_of(__ushort_as_bfloat16(bits));
}
__device__ __forceinline__ uint32_t key_of_bits(uint16_t bits, __half*) { return key_of(__ushort_as_half(bits)); }

// Loads kWarpUnroll * 32 keys of a warp range starting at `base` (lane-interleaved: entry base + u * 32 + lane).
// 16-bit x (base is even: ranges start at multiples of 32 * kWarpUnroll): each lane loads one 32-bit word of two
// entries and two shuffles deal them out in the same lane order, half the load instructions of one entry per
// lane, which left the bf16 count and write passes at 1.9x the fp32 ones per entry (session 10).
template <typename T>
__device__ __forceinline__ void load_keys(const T* __restrict__ x, int64_t base, int64_t end, int lane,
                                          uint32_t (&keys)[kWarpUnroll]) {
  if constexpr (sizeof(T) == 2) {
    if ((reinterpret_cast<uintptr_t>(x) & 3u) == 0) {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
#pragma unroll
      for (int p = 0; p < kWarpUnroll / 2; ++p) {
        const int64_t e = base + p * 64 + 2 * lane;  // this lane's word: entries e and e + 1
        uint32_t word = 0;
        if (e + 1 < end) {
          word = *reinterpret_cast<const uint32_t*>(bits + e);
        } else if (e < end) {
          word = bits[e];
        }
        // entry base + 64p + l (key u = 2p) is half l & 1 of lane l / 2's word; entry + 32 (u = 2p + 1) of
        // lane 16 + l / 2's
        const uint32_t w0 = __shfl_sync(kFullMask, word, lane >> 1);
        const uint32_t w1 = __shfl_sync(kFullMask, word, 16 + (lane >> 1));
        const int shift = (lane & 1) * 16;
        const int64_t i0 = base + p * 64 + lane;
        keys[2 * p] = i0 < end ? key_of_bits(static_cast<uint16_t>(w0 >> shift), static_cast<T*>(nullptr)) : 0u;
        keys[2 * p + 1] =
            i0 + 32 < end ? key_of_bits(static_cast<uint16_t>(w1 >> shift), static_cast<T*>(nullptr)) : 0u;
      }
      return;
    }
  }
#pragma unroll
  for (int u = 0; u < kWarpUnroll; ++u) {
    const int64_t i = base + u * 32 + lane;
    keys[u] = i < end ? key_of(x[i]) : 0u;
  }
}

// Walks the warp's range [start, end) in position order, kWarpUnroll * 32 entries at a time, calling
// visit(i, valid, key) in every lane (all lanes together, so visit may use warp votes), with key 0 for an
// excluded entry. The warp's excluded entries are marked segment by segment in a bitmap in shared memory,
// filled from a coalesced walk of `exclude` (its entries are sorted): one broadcast shared load per 32 entries
// instead of a binary search per candidate (which made the write pass 2x a streaming pass).
template <typename T, typename IdxT, typename Visit>
__device__ __forceinline__ void walk_range(const T* __restrict__ x, int64_t start, int64_t end,
                                           const IdxT* __restrict__ exclude, int64_t n_excl,
                                           int64_t exclude_offset, uint32_t* __restrict__ bitmap, Visit visit) {
  const int lane = threadIdx.x & 31;
  int64_t next = n_excl > 0 ? warp_lower_bound(exclude, 0, n_excl, exclude_offset + start) : 0;
  for (int64_t seg = start; seg < end; seg += kSegment) {
    const int64_t seg_end = min(end, seg + kSegment);
    if (n_excl > 0) {
      for (int w = lane; w < kSegmentWords; w += 32) bitmap[w] = 0u;
      __syncwarp();
      while (true) {  // place the exclude entries of [seg, seg_end), 32 at a time
        const int64_t e = next + lane;
        const int64_t pos = e < n_excl ? static_cast<int64_t>(exclude[e]) - exclude_offset : INT64_MAX;
        const bool inside = pos < seg_end;  // and >= seg: the earlier ones were placed before
        if (inside) atomicOr(bitmap + ((pos - seg) >> 5), 1u << ((pos - seg) & 31));
        const int placed = __popc(__ballot_sync(kFullMask, inside));
        next += placed;
        if (placed < 32) break;
      }
      __syncwarp();
    }
    for (int64_t base = seg; base < seg_end; base += 32 * kWarpUnroll) {
      uint32_t keys[kWarpUnroll];
      load_keys(x, base, seg_end, lane, keys);
#pragma unroll
      for (int u = 0; u < kWarpUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        // base - seg is a multiple of 32 * kWarpUnroll: word u of this group is entry i's, bit `lane`
        if (n_excl > 0 && ((bitmap[((base - seg) >> 5) + u] >> lane) & 1u)) keys[u] = 0u;
        visit(i, i < seg_end, keys[u]);
      }
    }
    __syncwarp();  // every lane has read the bitmap before the next segment clears it
  }
}

__device__ __forceinline__ unsigned long long pack_counts(int above, int ties) {
  return (static_cast<unsigned long long>(static_cast<uint32_t>(above)) << 32) + static_cast<uint32_t>(ties);
}

__device__ __forceinline__ unsigned long long load_counts(const int* __restrict__ at) {
  return pack_counts(__ldcg(at), __ldcg(at + 1));
}

// Per warp range: entries with key > T and key == T. Writes each warp's counts and each CTA's total.
template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads) count_kernel(const T* __restrict__ x, int64_t n,
                                                        const IdxT* __restrict__ exclude, int64_t n_excl,
                                                        int64_t exclude_offset, int64_t warp_range,
                                                        int* __restrict__ ws) {
  __shared__ uint32_t bitmaps[kWarps][kSegmentWords];
  __shared__ unsigned long long warp_counts[kWarps];
  const int lane = threadIdx.x & 31, warp_in_cta = threadIdx.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + warp_in_cta;
  const int64_t start = min(n, warp * warp_range), end = min(n, start + warp_range);
  const uint32_t threshold = static_cast<uint32_t>(ws[kPrefix]);
  int above = 0, ties = 0;
  walk_range(x, start, end, exclude, n_excl, exclude_offset, bitmaps[warp_in_cta],
             [&](int64_t, bool valid, uint32_t key) {
               above += valid && key > threshold;
               ties += valid && key == threshold;
             });
  above = __reduce_add_sync(kFullMask, above);
  ties = __reduce_add_sync(kFullMask, ties);
  int* const cta_totals = ws + kCounts;
  int* const warp_totals = cta_totals + 2 * gridDim.x;
  if (lane == 0) {
    warp_totals[2 * warp] = above;
    warp_totals[2 * warp + 1] = ties;
    warp_counts[warp_in_cta] = pack_counts(above, ties);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];  // (above, ties) < 2**31 each: no carry
    cta_totals[2 * blockIdx.x] = static_cast<int>(total >> 32);
    cta_totals[2 * blockIdx.x + 1] = static_cast<int>(total & 0xffffffffu);
  }
}

// The same warp ranges: ballots give each chosen entry its slot (the chosen entries before it).
template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads) write_kernel(const T* __restrict__ x, int64_t n,
                                                        const IdxT* __restrict__ exclude, int64_t n_excl,
                                                        int64_t exclude_offset, int64_t warp_range,
                                                        const int* __restrict__ ws, int64_t* __restrict__ positions,
                                                        float* __restrict__ magnitudes) {
  __shared__ uint32_t bitmaps[kWarps][kSegmentWords];
  __shared__ unsigned long long warp_before[kWarps];
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int lane = threadIdx.x & 31, warp_in_cta = threadIdx.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + warp_in_cta;
  const int* const cta_totals = ws + kCounts;
  const int* const warp_totals = cta_totals + 2 * gridDim.x;
  // this warp's exclusive prefix of (above, ties): the CTAs before this one, then the warps before it
  unsigned long long before_cta = 0;
  for (int b = threadIdx.x; b < static_cast<int>(blockIdx.x); b += kThreads) before_cta += load_counts(cta_totals + 2 * b);
  before_cta = Reduce(reduce_storage).Sum(before_cta);
  if (threadIdx.x < kWarps) warp_before[threadIdx.x] = load_counts(warp_totals + 2 * (blockIdx.x * kWarps + threadIdx.x));
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long running = before_cta;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned long long mine = warp_before[w];
      warp_before[w] = running;
      running += mine;
    }
  }
  __syncthreads();
  const int64_t start = min(n, warp * warp_range), end = min(n, start + warp_range);
  if (start >= end) return;  // warp-uniform, after the CTA-wide steps
  const uint32_t threshold = static_cast<uint32_t>(ws[kPrefix]);
  const int need = ws[kRemaining];  // ties to take, the first by position
  int above_before = static_cast<int>(warp_before[warp_in_cta] >> 32);
  int ties_before = static_cast<int>(warp_before[warp_in_cta] & 0xffffffffu);
  const unsigned lanes_below = (1u << lane) - 1u;
  walk_range(x, start, end, exclude, n_excl, exclude_offset, bitmaps[warp_in_cta],
             [&](int64_t i, bool valid, uint32_t key) {
               const bool is_above = valid && key > threshold;
               const bool is_tie = valid && key == threshold;
               const unsigned above_mask = __ballot_sync(kFullMask, is_above);
               const unsigned tie_mask = __ballot_sync(kFullMask, is_tie);
               const int my_above = above_before + __popc(above_mask & lanes_below);
               const int my_ties = ties_before + __popc(tie_mask & lanes_below);
               if (is_above || (is_tie && my_ties < need)) {
                 const int64_t slot = static_cast<int64_t>(my_above) + min(my_ties, need);
                 positions[slot] = i;
                 magnitudes[slot] = magnitude_of(key);
               }
               above_before += __popc(above_mask);
               ties_before += __popc(tie_mask);
             });
}

// CTAs of `kernel` resident per SM: grids are sized to one full wave (a partial second wave of these
// streaming kernels would cost up to a third of their time).
template <typename Kernel>
int resident_ctas(Kernel kernel) {
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, 0));
  return ctas > 0 ? ctas : 1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_topk_abs_cuda(const at::Tensor& x, int64_t k,
                                                        const std::optional<at::Tensor>& exclude,
                                                        int64_t exclude_offset) {
  constexpr const char* what = "spiel::_cuda_select_topk_abs";
  check_cuda_contig(x, what, "x");
  TORCH_CHECK(x.dim() == 1, what, ": x must be 1-D");
  const int64_t n = x.numel();
  TORCH_CHECK(n < (int64_t{1} << 31), what, ": x must have fewer than 2**31 elements");
  TORCH_CHECK(0 <= k && k <= n, what, ": k must be in [0, ", n, "], got ", k);
  const bool has_exclude = exclude.has_value() && exclude->numel() > 0;
  if (has_exclude) {
    check_cuda_contig(*exclude, what, "exclude");
    TORCH_CHECK(exclude->dim() == 1 && exclude->device() == x.device(), what,
                ": exclude must be 1-D on x's device");
  }
  auto positions = at::empty({k}, x.options().dtype(at::kLong));
  auto magnitudes = at::empty({k}, x.options().dtype(at::kFloat));
  if (k == 0) return {positions, magnitudes};
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = std::max<int64_t>(1, ceil_div(n, static_cast<int64_t>(kThreads) * kUnroll));
  const int sms = num_sms(x.get_device());
  const int64_t n_excl = has_exclude ? exclude->numel() : 0;
  const auto index_type = has_exclude ? exclude->scalar_type() : at::kInt;
  SPIEL_DISPATCH_FLOAT(x.scalar_type(), T, what, [&] {
    SPIEL_DISPATCH_INDEX(index_type, IdxT, what, [&] {
      // one wave each: the histogram passes stride over x; count and write share one warp partition
      static const int hist_ctas = std::min({resident_ctas(hist_kernel<T, IdxT, 0>),
                                             resident_ctas(hist_kernel<T, IdxT, 1>),
                                             resident_ctas(hist_kernel<T, IdxT, 2>)});
      static const int scan_ctas = std::min(resident_ctas(count_kernel<T, IdxT>), resident_ctas(write_kernel<T, IdxT>));
      const int64_t hist_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(hist_ctas) * sms);
      const int64_t blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(scan_ctas) * sms);
      const int64_t warps = blocks * kWarps;
      const int64_t warp_range = ceil_div(ceil_div(n, warps), 32 * kWarpUnroll) * 32 * kWarpUnroll;
      auto ws = at::zeros({kCounts + 2 * blocks + 2 * warps}, x.options().dtype(at::kInt));
      int* ws_ptr = ws.data_ptr<int>();
      const T* x_ptr = static_cast<const T*>(x.data_ptr());
      const IdxT* excl_ptr = has_exclude ? static_cast<const IdxT*>(exclude->data_ptr()) : nullptr;
      const int k32 = static_cast<int>(k);
      const dim3 hist_grid(static_cast<unsigned>(hist_blocks)), grid(static_cast<unsigned>(blocks));
      hist_kernel<T, IdxT, 0><<<hist_grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, k32, ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hist_kernel<T, IdxT, 1><<<hist_grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, k32, ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hist_kernel<T, IdxT, 2><<<hist_grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, k32, ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      count_kernel<T, IdxT><<<grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, warp_range,
                                                           ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      write_kernel<T, IdxT><<<grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, warp_range,
                                                           ws_ptr, positions.data_ptr<int64_t>(),
                                                           magnitudes.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {positions, magnitudes};
}

}  // namespace spiel
