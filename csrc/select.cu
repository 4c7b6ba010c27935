// Exact top-k of |x| as a set (spiel::select_topk_abs, backend "cuda"): the SpIEL-AG probe's choice of the
// k largest weight-gradient entries of a layer, 16.7M-67M entries per call.
//
// Order: key(x) orders magnitudes as unsigned ints, NaN as 0 (key 1, with zeros); an excluded position (in
// `exclude`, shifted by `exclude_offset`) has key 0, below every other; equal keys rank by the smaller position.
// fp32 x: key = bits(|x|) + 1. bf16 / fp16 x: key = (bits(x) & 0x7fff) + 1, the same order in 15 bits, so one
// histogram of 32768 bins holds every key. The answer is the k positions of largest (key, -position), written in
// ascending position order with their |x| (-inf for an excluded one, returned only when fewer than k others exist).
//
// Schedule (no host sync, no sort: one memset and 3 kernels for 16-bit x, 5 for fp32). Every kernel walks
// warp-contiguous ranges of x with 16-byte loads, the excluded positions of each 8192-entry segment marked in a
// shared-memory bitmap from a coalesced walk of the sorted `exclude` (walk_range).
//   levels   radix select: a shared-memory histogram per CTA of the keys matching the prefix chosen so far,
//            merged into a global histogram; the last CTA to finish picks the bin that holds the k-th key. 16-bit
//            x: one level of 32768 bins (the whole key); fp32: 11 + 11 + 10 bits. After the last level the prefix
//            is the k-th key T: `above` entries have a larger key and `need` = k - above of those equal to T are
//            taken, the first by position.
//   count    per warp range: entries with key > T and key == T; per-warp and per-CTA totals.
//   write    the same warp ranges again: each CTA sums the totals of the CTAs before it; a warp scan gives each
//            chosen entry its output slot.
// Integer atomics only, so the answer and every count are deterministic.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSegment = 8192;  // entries per exclusion bitmap of a warp (1 KiB of shared memory)
constexpr int kSegmentWords = kSegment / 32;
constexpr int kMaxBins = 1 << 15;
// workspace (int32): the global histogram, the select state, then (above, ties) per CTA, then per warp
constexpr int kCounter = kMaxBins;        // CTAs done with the current pass
constexpr int kPrefix = kMaxBins + 1;     // key bits fixed so far (the k-th key T after the last level)
constexpr int kRemaining = kMaxBins + 2;  // how many of the entries matching the prefix are still to take
constexpr int kAbove = kMaxBins + 3;      // entries whose key is above every key matching the prefix
constexpr int kCounts = kMaxBins + 8;

template <typename T>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }  // entries per 16-byte load
// 16-byte loads in flight per lane in the histogram levels' walk_range, and their CTAs per SM: 64 KiB in flight
// per SM either way (the streaming passes are latency-bound below that). 16-bit x: the level-0 histogram (128 KiB)
// allows one CTA per SM: 8 loads per lane, up to 128 registers; fp32: two CTAs, 4 loads in 64 registers.
template <typename T>
constexpr int loads_of() { return sizeof(T) == 2 ? 8 : 4; }
template <typename T>
constexpr int min_ctas() { return sizeof(T) == 2 ? 1 : 2; }
template <typename T, int LOADS = loads_of<T>()>
constexpr int group_of() { return 32 * vec_of<T>() * LOADS; }  // entries per warp step of walk_range
// count and write run two CTAs per SM (64 registers) for either element size: 16-bit x then takes 2 loads per lane
// (4 spilled 30-40 bytes)
template <typename T>
constexpr int scan_loads() { return sizeof(T) == 2 ? 2 : 4; }
static_assert(kSegment % group_of<__nv_bfloat16>() == 0 && kSegment % group_of<float>() == 0,
              "a segment holds whole warp steps");

// Radix levels: 16-bit x one level over the whole 15-bit key; fp32 x bits 21-31, 10-20, 0-9.
template <typename T>
constexpr int num_levels() { return sizeof(T) == 2 ? 1 : 3; }
template <typename T>
__host__ __device__ constexpr int level_shift(int level) {
  return sizeof(T) == 2 ? 0 : (level == 0 ? 21 : (level == 1 ? 10 : 0));
}
template <typename T>
__host__ __device__ constexpr int level_bits(int level) {
  return sizeof(T) == 2 ? 15 : (level == 2 ? 10 : 11);
}
template <typename T>
constexpr int level_smem(int level) { return (1 << level_bits<T>(level)) * static_cast<int>(sizeof(int)); }

__device__ __forceinline__ uint32_t key_of(float v) {
  return isnan(v) ? 1u : __float_as_uint(fabsf(v)) + 1u;  // at most 0x7f800001 (inf)
}
__device__ __forceinline__ uint32_t key_of(__nv_bfloat16 v) {
  const uint32_t bits = __bfloat16_as_ushort(v) & 0x7fffu;
  return bits > 0x7f80u ? 1u : bits + 1u;  // NaN: exponent all ones, mantissa not 0
}
__device__ __forceinline__ uint32_t key_of(__half v) {
  const uint32_t bits = __half_as_ushort(v) & 0x7fffu;
  return bits > 0x7c00u ? 1u : bits + 1u;
}

template <typename T>
__device__ __forceinline__ float magnitude_of(uint32_t key) {
  if (key == 0) return -INFINITY;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(key - 1u)));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(key - 1u)));
  } else {
    return __uint_as_float(key - 1u);
  }
}

// The keys of a vector of V entries (bit v of `excluded` set: key 0).
template <typename T>
__device__ __forceinline__ void keys_of(const Vec16<T>& raw, uint32_t excluded, uint32_t (&keys)[vec_of<T>()]) {
#pragma unroll
  for (int v = 0; v < vec_of<T>(); ++v) keys[v] = (excluded >> v) & 1u ? 0u : key_of(raw.v[v]);
}

// An upper bound of the keys of a vector from its magnitude bits alone (a NaN counts by its bits, above inf; an
// excluded entry by its value): every key is below T when this is. Count and write skip such vectors, ~99% of
// them, in ~2 instructions per entry: the exact per-entry keys made those passes instruction-bound (ncu: SM ~65%
// busy at 26-41% of DRAM bandwidth).
template <typename T>
__device__ __forceinline__ uint32_t key_bound(const Vec16<T>& raw) {
  const uint4 w = reinterpret_cast<const uint4&>(raw);
  if constexpr (sizeof(T) == 2) {
    const uint32_t m = __vmaxu2(__vmaxu2(w.x & 0x7fff7fffu, w.y & 0x7fff7fffu),
                                __vmaxu2(w.z & 0x7fff7fffu, w.w & 0x7fff7fffu));
    return max(m & 0xffffu, m >> 16) + 1u;
  } else {
    return max(max(w.x & 0x7fffffffu, w.y & 0x7fffffffu), max(w.z & 0x7fffffffu, w.w & 0x7fffffffu)) + 1u;
  }
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

// The j-th bin of this thread's share, in descending key order: thread t holds bins BINS-1-t*per-j, j < per.
template <int BINS>
__device__ __forceinline__ int descending_bin(int j) {
  constexpr int per = BINS / kThreads;
  return BINS - 1 - static_cast<int>(threadIdx.x) * per - j;
}

// The last CTA of a level: the global histogram copied into shared memory (`counts`, the CTA's own histogram
// array) and the global bins and CTA counter cleared for the next level. Returns, via a block scan, the sum of
// this thread's bins and of the threads' before it.
template <int BINS>
__device__ __forceinline__ void gather_bins(int* __restrict__ ws, int* __restrict__ counts, int& sum, int& before) {
  static_assert(BINS % kThreads == 0, "bins split evenly over the threads");
  constexpr int per = BINS / kThreads;
#pragma unroll 8
  for (int i = threadIdx.x; i < BINS; i += kThreads) counts[i] = __ldcg(ws + i);
  __syncthreads();
#pragma unroll 8
  for (int i = threadIdx.x; i < BINS; i += kThreads) ws[i] = 0;
  if (threadIdx.x == 0) ws[kCounter] = 0;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  sum = 0;
  for (int j = 0; j < per; ++j) sum += counts[descending_bin<BINS>((j + threadIdx.x) % per)];  // rotated: no bank conflicts
  Scan(scan_storage).ExclusiveSum(sum, before);
}

// The bin of this thread's share that holds the target-th entry from the top (before < target <= before + sum);
// `above` gets the entries in higher bins.
template <int BINS>
__device__ __forceinline__ int find_bin(const int* __restrict__ counts, int target, int before, int& above) {
  constexpr int per = BINS / kThreads;
  int bin = descending_bin<BINS>(per - 1);
  for (int j = 0; j < per; ++j) {
    const int count = counts[descending_bin<BINS>(j)];
    if (target <= before + count) {
      bin = descending_bin<BINS>(j);
      break;
    }
    before += count;
  }
  above = before;
  return bin;
}

// The last CTA of a level picks the bin of the k-th key among those matching the prefix.
template <typename T, int LEVEL>
__device__ void pick_bin(int* __restrict__ ws, int* __restrict__ counts, int k) {
  constexpr int shift = level_shift<T>(LEVEL), bins = 1 << level_bits<T>(LEVEL);
  const int remaining = LEVEL == 0 ? k : __ldcg(ws + kRemaining);
  int sum, before;
  gather_bins<bins>(ws, counts, sum, before);
  if (before < remaining && remaining <= before + sum) {  // exactly one thread holds the k-th key's bin
    int above;
    const int bin = find_bin<bins>(counts, remaining, before, above);
    const int prefix = LEVEL == 0 ? 0 : __ldcg(ws + kPrefix);
    const int above_prefix = LEVEL == 0 ? 0 : __ldcg(ws + kAbove);
    ws[kPrefix] = prefix | (bin << shift);
    ws[kRemaining] = remaining - above;
    ws[kAbove] = above_prefix + above;
  }
}

// Walks the warp's range [start, end) in position order, one warp step (32 lanes x LOADS 16-byte vectors) at a
// time: lane l of load u holds the V consecutive entries from base + (32u + l) V. Calls
// visit(first, raw, valid, excluded) for each load u in all lanes together (so visit may use warp votes and
// shuffles): raw holds the V entries; bit v of `valid` is set for an entry below `end`, of `excluded` for an
// excluded one (key 0). The excluded positions of each segment are marked in a bitmap in shared memory from a
// coalesced walk of `exclude` (sorted): one shared load per vector instead of a search per entry.
template <int LOADS, typename T, typename IdxT, typename Visit>
__device__ __forceinline__ void walk_range(const T* __restrict__ x, int64_t start, int64_t end,
                                           const IdxT* __restrict__ exclude, int64_t n_excl,
                                           int64_t exclude_offset, uint32_t* __restrict__ bitmap, Visit visit) {
  constexpr int V = vec_of<T>(), G = group_of<T, LOADS>();
  constexpr uint32_t vmask = (1u << V) - 1u;
  if (start >= end) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  // 16-byte loads need x on a 16-byte boundary (ranges start at multiples of G entries); a view that starts
  // elsewhere takes the entries one by one
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  int64_t next = -1;  // the first exclude entry not placed yet (found at the first segment)
  for (int64_t seg = start; seg < end; seg += kSegment) {
    const int64_t seg_end = min(end, seg + kSegment);
    for (int64_t base = seg; base < seg_end; base += G) {
      Vec16<T> raw[LOADS];
      if (aligned && base + G <= seg_end) {  // a whole step: every load issued back to back
#pragma unroll
        for (int u = 0; u < LOADS; ++u)
          raw[u] = *reinterpret_cast<const Vec16<T>*>(x + base + static_cast<int64_t>(u * 32 + lane) * V);
      } else {
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
          const int64_t first = base + static_cast<int64_t>(u * 32 + lane) * V;
#pragma unroll
          for (int v = 0; v < V; ++v) raw[u].v[v] = first + v < seg_end ? x[first + v] : x[seg];
        }
      }
      if (n_excl > 0 && base == seg) {
        // the segment's bitmap, built while the first step's loads are in flight: 128 sorted exclude entries
        // (4 per lane) per round of dependent loads
        if (next < 0) next = warp_lower_bound(exclude, 0, n_excl, exclude_offset + start);
        __syncwarp();  // the previous segment's bitmap has been read
        for (int w = lane; w < kSegmentWords; w += 32) bitmap[w] = 0u;
        __syncwarp();
        while (true) {
          int placed = 0;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int64_t e = next + 4 * lane + r;
            const int64_t pos = e < n_excl ? static_cast<int64_t>(exclude[e]) - exclude_offset : INT64_MAX;
            if (pos < seg_end) {  // and >= seg: the earlier ones were placed before
              atomicOr(bitmap + ((pos - seg) >> 5), 1u << ((pos - seg) & 31));
              ++placed;
            }
          }
          placed = __reduce_add_sync(kFullMask, placed);  // sorted: the placed entries are a prefix
          next += placed;
          if (placed < 128) break;
        }
        __syncwarp();
      }
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        const int64_t first = base + static_cast<int64_t>(u * 32 + lane) * V;
        const int64_t left = seg_end - first;
        const uint32_t valid = left >= V ? vmask : (left > 0 ? (1u << left) - 1u : 0u);
        // first - seg is a multiple of V (a power of 2 <= 8) below kSegment: the V bits lie in one word
        const int off = static_cast<int>(first - seg);
        const uint32_t excluded = n_excl > 0 ? (bitmap[off >> 5] >> (off & 31)) & vmask : 0u;
        visit(first, raw[u], valid, excluded);
      }
    }
  }
}

// One radix level: a shared-memory histogram per CTA of the keys matching the prefix, merged into the global
// one; the last CTA to finish picks the next bin.
template <typename T, typename IdxT, int LEVEL>
__global__ void __launch_bounds__(kThreads, min_ctas<T>()) hist_kernel(const T* __restrict__ x, int64_t n,
                                                                       const IdxT* __restrict__ exclude,
                                                                       int64_t n_excl, int64_t exclude_offset,
                                                                       int64_t warp_range, int k,
                                                                       int* __restrict__ ws) {
  constexpr int shift = level_shift<T>(LEVEL), bins = 1 << level_bits<T>(LEVEL);
  constexpr int high = shift + level_bits<T>(LEVEL);
  extern __shared__ int hist[];  // bins
  __shared__ uint32_t bitmaps[kWarps][kSegmentWords];
  const uint32_t prefix = LEVEL == 0 ? 0u : static_cast<uint32_t>(__ldcg(ws + kPrefix));
  for (int i = threadIdx.x; i < bins; i += kThreads) hist[i] = 0;
  __syncthreads();
  const int warp_in_cta = threadIdx.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + warp_in_cta;
  const int64_t start = min(n, warp * warp_range), end = min(n, start + warp_range);
  walk_range<loads_of<T>()>(x, start, end, exclude, n_excl, exclude_offset, bitmaps[warp_in_cta],
                            [&](int64_t, const Vec16<T>& raw, uint32_t valid, uint32_t excluded) {
                              // past level 0 only keys >= the prefix's lowest can match: most vectors skip
                              if constexpr (LEVEL > 0) {
                                if (key_bound(raw) < (prefix >> high << high)) return;
                              }
                              uint32_t keys[vec_of<T>()];
                              keys_of(raw, excluded, keys);
#pragma unroll
                              for (int v = 0; v < vec_of<T>(); ++v) {
                                bool take = (valid >> v) & 1u;
                                if constexpr (LEVEL > 0) take = take && (keys[v] >> high) == (prefix >> high);
                                // plain shared atomics: aggregating equal bins per warp with __match_any_sync
                                // measured 2.4x slower (session 6)
                                if (take) atomicAdd(hist + ((keys[v] >> shift) & (bins - 1)), 1);
                              }
                            });
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += kThreads)
    if (hist[i] != 0) atomicAdd(ws + i, hist[i]);
  if (last_to_arrive(ws)) pick_bin<T, LEVEL>(ws, hist, k);  // (every merge is done: the CTA's array is free)
}

__device__ __forceinline__ unsigned long long pack_counts(int above, int ties) {
  return (static_cast<unsigned long long>(static_cast<uint32_t>(above)) << 32) + static_cast<uint32_t>(ties);
}

__device__ __forceinline__ unsigned long long load_counts(const int* __restrict__ at) {
  return pack_counts(__ldcg(at), __ldcg(at + 1));
}

// Per warp range: entries with key > T and key == T. Writes each warp's counts and each CTA's total.
template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads, 2) count_kernel(const T* __restrict__ x, int64_t n,
                                                        const IdxT* __restrict__ exclude, int64_t n_excl,
                                                        int64_t exclude_offset, int64_t warp_range,
                                                        int* __restrict__ ws) {
  __shared__ uint32_t bitmaps[kWarps][kSegmentWords];
  __shared__ unsigned long long warp_counts[kWarps];
  const int lane = threadIdx.x & 31, warp_in_cta = threadIdx.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + warp_in_cta;
  const int64_t start = min(n, warp * warp_range), end = min(n, start + warp_range);
  const uint32_t threshold = static_cast<uint32_t>(__ldcg(ws + kPrefix));
  int above = 0, ties = 0;
  walk_range<scan_loads<T>()>(x, start, end, exclude, n_excl, exclude_offset, bitmaps[warp_in_cta],
             [&](int64_t, const Vec16<T>& raw, uint32_t valid, uint32_t excluded) {
               if (key_bound(raw) < threshold) return;
               uint32_t keys[vec_of<T>()];
               keys_of(raw, excluded, keys);
#pragma unroll
               for (int v = 0; v < vec_of<T>(); ++v) {
                 const bool in = (valid >> v) & 1u;
                 above += in && keys[v] > threshold;
                 ties += in && keys[v] == threshold;
               }
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

// The same warp ranges: a warp scan gives each chosen entry its slot (the chosen entries before it).
template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads, 2) write_kernel(const T* __restrict__ x, int64_t n,
                                                        const IdxT* __restrict__ exclude, int64_t n_excl,
                                                        int64_t exclude_offset, int64_t warp_range,
                                                        const int* __restrict__ ws, int64_t* __restrict__ positions,
                                                        float* __restrict__ magnitudes) {
  constexpr int V = vec_of<T>();
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
  const uint32_t threshold = static_cast<uint32_t>(__ldcg(ws + kPrefix));
  const int need = __ldcg(ws + kRemaining);  // ties to take, the first by position
  int above_before = static_cast<int>(warp_before[warp_in_cta] >> 32);
  int ties_before = static_cast<int>(warp_before[warp_in_cta] & 0xffffffffu);
  walk_range<scan_loads<T>()>(x, start, end, exclude, n_excl, exclude_offset, bitmaps[warp_in_cta],
             [&](int64_t first, const Vec16<T>& raw, uint32_t valid, uint32_t excluded) {
               const bool maybe = key_bound(raw) >= threshold;
               if (__ballot_sync(kFullMask, maybe) == 0) return;  // nothing chosen in this load: no scan
               // (above, ties) of this lane's V entries packed in 16 + 16 bits (a warp step holds <= 32 * V)
               uint32_t keys[V];  // set where maybe (only read where mine != 0)
               uint32_t mine = 0;
               if (maybe) {
                 keys_of(raw, excluded, keys);
#pragma unroll
                 for (int v = 0; v < V; ++v) {
                   const bool in = (valid >> v) & 1u;
                   mine += (in && keys[v] > threshold) ? (1u << 16) : (in && keys[v] == threshold ? 1u : 0u);
                 }
               }
               uint32_t inclusive = mine;
#pragma unroll
               for (int d = 1; d < 32; d <<= 1) {
                 const uint32_t up = __shfl_up_sync(kFullMask, inclusive, d);
                 if (lane >= d) inclusive += up;
               }
               const uint32_t exclusive = inclusive - mine, warp_total = __shfl_sync(kFullMask, inclusive, 31);
               if (mine != 0) {
                 int my_above = above_before + static_cast<int>(exclusive >> 16);
                 int my_ties = ties_before + static_cast<int>(exclusive & 0xffffu);
#pragma unroll
                 for (int v = 0; v < V; ++v) {
                   if (!((valid >> v) & 1u)) continue;
                   if (keys[v] > threshold) {
                     const int64_t slot = static_cast<int64_t>(my_above) + min(my_ties, need);
                     positions[slot] = first + v;
                     magnitudes[slot] = magnitude_of<T>(keys[v]);
                     ++my_above;
                   } else if (keys[v] == threshold) {
                     if (my_ties < need) {
                       const int64_t slot = static_cast<int64_t>(my_above) + my_ties;
                       positions[slot] = first + v;
                       magnitudes[slot] = magnitude_of<T>(keys[v]);
                     }
                     ++my_ties;
                   }
                 }
               }
               above_before += static_cast<int>(warp_total >> 16);
               ties_before += static_cast<int>(warp_total & 0xffffu);
             });
}

// Lets `kernel` use `smem` bytes of dynamic shared memory on the current device (above the 48 KiB default);
// per call, as the attribute belongs to the device's context (a few us of host only for the 16-bit levels).
template <typename Kernel>
void allow_smem(Kernel kernel, int smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
}

// CTAs of `kernel` resident per SM: grids are sized to one full wave (a partial second wave of these
// streaming kernels would cost up to a third of their time).
template <typename Kernel>
int resident_ctas(Kernel kernel, int smem) {
  allow_smem(kernel, smem);
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
  return ctas > 0 ? ctas : 1;
}

// The launches of one call (a template, so the fp32-only levels are not instantiated for 16-bit x).
template <typename T, typename IdxT>
void launch_select(const T* x_ptr, int64_t n, const IdxT* excl_ptr, int64_t n_excl, int64_t exclude_offset,
                   int64_t k, int sms, const at::TensorOptions& options, int64_t* positions,
                   float* magnitudes, cudaStream_t stream) {
  constexpr int G = group_of<T>();
  // one wave each; the levels share one warp partition, count and write another
  static const int hist_ctas = [] {
    int ctas = resident_ctas(hist_kernel<T, IdxT, 0>, level_smem<T>(0));
    if constexpr (num_levels<T>() == 3) {
      ctas = std::min({ctas, resident_ctas(hist_kernel<T, IdxT, 1>, level_smem<T>(1)),
                       resident_ctas(hist_kernel<T, IdxT, 2>, level_smem<T>(2))});
    }
    return ctas;
  }();
  static const int scan_ctas =
      std::min(resident_ctas(count_kernel<T, IdxT>, 0), resident_ctas(write_kernel<T, IdxT>, 0));
  const int64_t max_blocks = std::max<int64_t>(1, ceil_div(n, static_cast<int64_t>(kWarps) * G));
  const int64_t hist_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(hist_ctas) * sms);
  const int64_t blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(scan_ctas) * sms);
  const int64_t warps = blocks * kWarps;
  const int64_t hist_range = ceil_div(ceil_div(n, hist_blocks * kWarps), G) * G;
  const int64_t warp_range = ceil_div(ceil_div(n, warps), G) * G;
  auto ws = at::zeros({kCounts + 2 * blocks + 2 * warps}, options.dtype(at::kInt));
  int* ws_ptr = ws.data_ptr<int>();
  const int k32 = static_cast<int>(k);
  const dim3 hist_grid(static_cast<unsigned>(hist_blocks)), grid(static_cast<unsigned>(blocks));
  auto level = [&](auto kernel, int smem) {
    allow_smem(kernel, smem);
    kernel<<<hist_grid, kThreads, smem, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, hist_range, k32,
                                                  ws_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  level(hist_kernel<T, IdxT, 0>, level_smem<T>(0));
  if constexpr (num_levels<T>() == 3) {
    level(hist_kernel<T, IdxT, 1>, level_smem<T>(1));
    level(hist_kernel<T, IdxT, 2>, level_smem<T>(2));
  }
  count_kernel<T, IdxT><<<grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, warp_range,
                                                       ws_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_kernel<T, IdxT><<<grid, kThreads, 0, stream>>>(x_ptr, n, excl_ptr, n_excl, exclude_offset, warp_range,
                                                       ws_ptr, positions, magnitudes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(0 <= k && k <= n, what, ": k must be in [0, ", msg_num(n), "], got ", msg_num(k));
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
  const int sms = num_sms(x.get_device());
  const int64_t n_excl = has_exclude ? exclude->numel() : 0;
  const auto index_type = has_exclude ? exclude->scalar_type() : at::kInt;
  SPIEL_DISPATCH_FLOAT(x.scalar_type(), T, what, [&] {
    SPIEL_DISPATCH_INDEX(index_type, IdxT, what, [&] {
      launch_select<T, IdxT>(static_cast<const T*>(x.data_ptr()), n,
                             has_exclude ? static_cast<const IdxT*>(exclude->data_ptr()) : nullptr, n_excl,
                             exclude_offset, k, sms, x.options(), positions.data_ptr<int64_t>(),
                             magnitudes.data_ptr<float>(), stream);
    });
  });
  return {positions, magnitudes};
}

}  // namespace spiel
