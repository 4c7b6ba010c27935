// The index replacement of an index update (spiel::drop_regrow_indices): for each of L rows (layers of one k),
// drop the n entries of smallest |value| (ties: the larger position leaves), insert the n regrown positions and
// return the merged, ascending indices with, for each new slot, the old slot it comes from (-1: regrown).
//
// The torch version (the reference backend) sorts every row by |value| and merges with searchsorted and
// scatters: ~40 launches and ~1.6 ms of GPU per 8M-entry batch at 7B (the sort alone 0.65 ms). Here:
//   1. a radix select per row over the 31 magnitude bits of fp32 |value| (levels of 11, 11 and 9 bits):
//      a histogram pass and a one-CTA find per level give the n-th smallest key K and how many of the keys
//      equal to K leave (the last ones by position);
//   2. a count pass: per 2048-entry chunk, how many keys are > K and == K;
//   3. a write pass per chunk: each kept entry's new slot is (kept entries before it) + (regrown positions
//      below it), each regrown position's slot is (its rank) + (kept entries below it); the chunk's indices
//      and the prefix counts sit in shared memory, the regrown positions of the chunk's index range too
//      (when they fit), so both searches run there.
// Nine launches per 64 rows, ~5 reads of the values and one write of the outputs; integer atomics only
// (the result does not depend on their order).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kRows = 64;                      // rows per launch group
constexpr int kThreads = 256;
constexpr int kChunk = 2048;                   // entries per CTA of the count and write passes
constexpr int kPerThread = kChunk / kThreads;  // consecutive entries of one thread in the write pass
constexpr int kSpan = 32768;                   // entries per CTA of the histogram passes
constexpr int kStage = 2048;                   // regrown positions of one chunk staged in shared memory
constexpr int kBins = 2048;
constexpr int kLevels = 3;
static_assert(kChunk % kThreads == 0 && kChunk < 65536, "chunk counts are packed in 16 bits");

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__host__ __device__ constexpr int level_shift(int level) { return level == 0 ? 20 : (level == 1 ? 9 : 0); }
__host__ __device__ constexpr int level_bits(int level) { return level == 2 ? 9 : 11; }

struct Rows {
  const void* values[kRows];
  const void* indices[kRows];
};

// Per row, after each level: the key bits fixed so far, and how many of the smallest keys under that prefix
// are still to be dropped (after the last level: how many keys equal to K are dropped, >= 1).
struct RowState {
  uint32_t prefix;
  int32_t remaining;
};

// fp32 |x| as an unsigned key with the same order (NaN above +inf, as the reference's sort puts it).
template <typename T>
__device__ __forceinline__ uint32_t key_of(T x) {
  return __float_as_uint(to_float(x)) & 0x7fffffffu;
}

template <typename T, int LEVEL>
__global__ void __launch_bounds__(kThreads) drop_hist_kernel(const Rows rows, int64_t k, const RowState* state,
                                                             int* hist) {
  constexpr int kShift = level_shift(LEVEL), kNum = 1 << level_bits(LEVEL), kHigh = kShift + level_bits(LEVEL);
  __shared__ int bins[kBins];
  const int row = blockIdx.y;
  const T* __restrict__ values = static_cast<const T*>(rows.values[row]);
  const uint32_t prefix = LEVEL == 0 ? 0u : state[row].prefix;
  for (int b = threadIdx.x; b < kNum; b += kThreads) bins[b] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSpan;
  const int64_t end = begin + kSpan < k ? begin + kSpan : k;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = key_of(values[i]);
    if (LEVEL == 0 || (key >> kHigh) == (prefix >> kHigh)) atomicAdd(&bins[(key >> kShift) & (kNum - 1)], 1);
  }
  __syncthreads();
  int* out = hist + (static_cast<int64_t>(LEVEL) * gridDim.y + row) * kBins;
  for (int b = threadIdx.x; b < kNum; b += kThreads) {
    if (bins[b] != 0) atomicAdd(out + b, bins[b]);
  }
}

// One CTA per row: the bin holding the remaining-th smallest key under the prefix.
template <int LEVEL>
__global__ void __launch_bounds__(kThreads) drop_find_kernel(const int* hist, RowState* state, int64_t n) {
  constexpr int kShift = level_shift(LEVEL), kNum = 1 << level_bits(LEVEL), kPer = kNum / kThreads;
  static_assert(kNum % kThreads == 0, "bins per thread");
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int row = blockIdx.x;
  const int* h = hist + (static_cast<int64_t>(LEVEL) * gridDim.x + row) * kBins;
  const uint32_t prefix = LEVEL == 0 ? 0u : state[row].prefix;
  const int remaining = LEVEL == 0 ? static_cast<int>(n) : state[row].remaining;
  int local[kPer];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    local[j] = h[threadIdx.x * kPer + j];
    sum += local[j];
  }
  int before;
  Scan(scan_storage).ExclusiveSum(sum, before);
  if (before < remaining && remaining <= before + sum) {  // exactly one thread
    int cum = before;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (remaining <= cum + local[j]) {
        const uint32_t bin = static_cast<uint32_t>(threadIdx.x * kPer + j);
        state[row].prefix = prefix | (bin << kShift);
        state[row].remaining = remaining - cum;
        break;
      }
      cum += local[j];
    }
  }
}

// Per chunk: keys > K (high 16 bits) and == K (low 16 bits).
template <typename T>
__global__ void __launch_bounds__(kThreads) drop_count_kernel(const Rows rows, int64_t k, const RowState* state,
                                                              uint32_t* counts, int chunks) {
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int row = blockIdx.y;
  const T* __restrict__ values = static_cast<const T*>(rows.values[row]);
  const uint32_t K = state[row].prefix;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < k ? begin + kChunk : k;
  uint32_t packed = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = key_of(values[i]);
    packed += (key > K ? 0x10000u : 0u) + (key == K ? 1u : 0u);
  }
  packed = Reduce(reduce_storage).Sum(packed);
  if (threadIdx.x == 0) counts[static_cast<int64_t>(row) * chunks + blockIdx.x] = packed;
}

// First p in [0, len) with a[p] >= x (len if none); a ascending.
template <typename A>
__device__ __forceinline__ int64_t lower_bound(const A* a, int64_t len, int64_t x) {
  int64_t lo = 0, hi = len;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(a[mid]) < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads) drop_write_kernel(const Rows rows, int64_t k, int64_t n,
                                                              const int64_t* __restrict__ regrown,
                                                              const RowState* state, const uint32_t* counts,
                                                              int chunks, IdxT* __restrict__ new_indices,
                                                              int64_t* __restrict__ order) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } storage;
  __shared__ int64_t chunk_indices[kChunk];
  __shared__ uint32_t below[kChunk + 1];  // packed (> K, == K) counts of the chunk's entries before each
  __shared__ int64_t staged[kStage];
  __shared__ int64_t shared_totals[3];
  __shared__ int64_t range[2];

  const int row = blockIdx.y, chunk = blockIdx.x;
  const T* __restrict__ values = static_cast<const T*>(rows.values[row]);
  const IdxT* __restrict__ indices = static_cast<const IdxT*>(rows.indices[row]);
  const int64_t* __restrict__ reg = regrown + static_cast<int64_t>(row) * n;
  const uint32_t K = state[row].prefix;
  const int64_t drop_equal = state[row].remaining;

  // 1. the row's keys == K, and the > K / == K keys of the chunks before this one
  int64_t equal_total = 0, greater_before = 0, equal_before = 0;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const uint32_t v = counts[static_cast<int64_t>(row) * chunks + c];
    equal_total += v & 0xffffu;
    if (c < chunk) {
      greater_before += v >> 16;
      equal_before += v & 0xffffu;
    }
  }
  equal_total = Reduce(storage.reduce).Sum(equal_total);
  __syncthreads();
  greater_before = Reduce(storage.reduce).Sum(greater_before);
  __syncthreads();
  equal_before = Reduce(storage.reduce).Sum(equal_before);
  if (threadIdx.x == 0) {
    shared_totals[0] = equal_total;
    shared_totals[1] = greater_before;
    shared_totals[2] = equal_before;
  }
  __syncthreads();
  // keys == K: the first (equal_total - drop_equal) by position stay
  const int64_t keep_equal = shared_totals[0] - drop_equal;
  const int64_t kept_before = shared_totals[1] + min64(shared_totals[2], keep_equal);
  const int64_t quota = max64(keep_equal - shared_totals[2], 0);  // this chunk's keys == K that stay

  // 2. the chunk's indices and packed prefix counts into shared memory
  const int64_t begin = static_cast<int64_t>(chunk) * kChunk;
  const int len = static_cast<int>(k - begin < kChunk ? k - begin : kChunk);
  uint32_t flags[kPerThread];
  uint32_t mine = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int p = threadIdx.x * kPerThread + j;
    flags[j] = 0;
    if (p < len) {
      const uint32_t key = key_of(values[begin + p]);
      chunk_indices[p] = static_cast<int64_t>(indices[begin + p]);
      flags[j] = (key > K ? 0x10000u : 0u) + (key == K ? 1u : 0u);
    }
    mine += flags[j];
  }
  uint32_t running, total;
  Scan(storage.scan).ExclusiveSum(mine, running, total);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int p = threadIdx.x * kPerThread + j;
    if (p < len) below[p] = running;
    running += flags[j];
  }
  if (threadIdx.x == 0) {
    below[len] = total;
    // regrown positions between the previous chunk's last index and this chunk's last: this chunk inserts them
    range[0] = chunk == 0 ? 0 : lower_bound(reg, n, static_cast<int64_t>(indices[begin - 1]));
    range[1] = begin + len == k ? n : lower_bound(reg, n, static_cast<int64_t>(indices[begin + len - 1]));
  }
  __syncthreads();
  const int64_t ra = range[0], rb = range[1];
  const bool staged_all = rb - ra <= kStage;
  if (staged_all) {
    for (int64_t j = ra + threadIdx.x; j < rb; j += kThreads) staged[j - ra] = reg[j];
  }
  __syncthreads();

  IdxT* __restrict__ out_indices = new_indices + static_cast<int64_t>(row) * k;
  int64_t* __restrict__ out_order = order + static_cast<int64_t>(row) * k;
  // 3. kept entries: slot = kept entries before + regrown positions below. Consecutive threads take consecutive
  // entries here (the scan above gave each thread a run of kPerThread), so a warp's stores land on consecutive
  // slots: coalesced (session 14's run-per-thread stores were 8 entries apart, 0.24 ms per 7B batch).
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int p = j * kThreads + threadIdx.x;
    if (p >= len) continue;
    const uint32_t flag = below[p + 1] - below[p];  // this entry's (> K, == K) bits
    const bool greater = flag >= 0x10000u, equal = (flag & 0xffffu) != 0;
    const uint32_t b = below[p];
    const int64_t equal_here = b & 0xffffu;
    if (!(greater || (equal && equal_here < quota))) continue;
    const int64_t idx = chunk_indices[p];
    const int64_t regrown_below =
        ra + (staged_all ? lower_bound(staged, rb - ra, idx) : lower_bound(reg + ra, rb - ra, idx));
    const int64_t slot = kept_before + (b >> 16) + min64(equal_here, quota) + regrown_below;
    out_indices[slot] = static_cast<IdxT>(idx);
    out_order[slot] = begin + p;
  }
  // 4. regrown positions of this chunk: slot = their rank + kept entries below
  for (int64_t j = ra + threadIdx.x; j < rb; j += kThreads) {
    const int64_t r = staged_all ? staged[j - ra] : reg[j];
    const int64_t q = lower_bound(chunk_indices, len, r);
    const uint32_t b = below[q];
    const int64_t slot = j + kept_before + (b >> 16) + min64(static_cast<int64_t>(b & 0xffffu), quota);
    out_indices[slot] = static_cast<IdxT>(r);
    out_order[slot] = -1;
  }
}

template <typename T, typename IdxT>
void launch_group(const Rows& rows, int count, int64_t k, int64_t n, const int64_t* regrown, IdxT* new_indices,
                  int64_t* order, const at::TensorOptions& int_options, cudaStream_t stream) {
  const int span_blocks = static_cast<int>(ceil_div(k, kSpan));
  const int chunks = static_cast<int>(ceil_div(k, kChunk));
  at::Tensor state = at::empty({count, 2}, int_options);
  at::Tensor hist = at::zeros({kLevels, count, kBins}, int_options);
  at::Tensor counts = at::empty({count, chunks}, int_options);
  auto* state_ptr = reinterpret_cast<RowState*>(state.data_ptr<int32_t>());
  int* hist_ptr = hist.data_ptr<int32_t>();
  const dim3 span_grid(span_blocks, count), chunk_grid(chunks, count);
  drop_hist_kernel<T, 0><<<span_grid, kThreads, 0, stream>>>(rows, k, state_ptr, hist_ptr);
  drop_find_kernel<0><<<count, kThreads, 0, stream>>>(hist_ptr, state_ptr, n);
  drop_hist_kernel<T, 1><<<span_grid, kThreads, 0, stream>>>(rows, k, state_ptr, hist_ptr);
  drop_find_kernel<1><<<count, kThreads, 0, stream>>>(hist_ptr, state_ptr, n);
  drop_hist_kernel<T, 2><<<span_grid, kThreads, 0, stream>>>(rows, k, state_ptr, hist_ptr);
  drop_find_kernel<2><<<count, kThreads, 0, stream>>>(hist_ptr, state_ptr, n);
  auto* counts_ptr = reinterpret_cast<uint32_t*>(counts.data_ptr<int32_t>());
  drop_count_kernel<T><<<chunk_grid, kThreads, 0, stream>>>(rows, k, state_ptr, counts_ptr, chunks);
  drop_write_kernel<T, IdxT><<<chunk_grid, kThreads, 0, stream>>>(rows, k, n, regrown, state_ptr, counts_ptr,
                                                                  chunks, new_indices, order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> drop_regrow_indices_cuda(at::TensorList values, at::TensorList indices,
                                                            const at::Tensor& regrown) {
  const char* what = "spiel::_cuda_drop_regrow_indices";
  const int64_t L = static_cast<int64_t>(values.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(indices.size()) == L, what,
              ": values and indices must be non-empty lists of one length");
  check_cuda_contig(regrown, what, "regrown");
  TORCH_CHECK(regrown.scalar_type() == at::kLong && regrown.dim() == 2 && regrown.size(0) == L, what,
              ": regrown must be int64 [len(values), n]");
  const int64_t k = values[0].numel(), n = regrown.size(1);
  TORCH_CHECK(n <= k && k < (int64_t{1} << 31), what, ": need n <= k < 2**31, got n = ", msg_num(n), ", k = ", msg_num(k));
  const auto device = regrown.device();
  const auto dtype = values[0].scalar_type(), index_type = indices[0].scalar_type();
  for (int64_t i = 0; i < L; ++i) {
    check_cuda_contig(values[i], what, "values");
    check_cuda_contig(indices[i], what, "indices");
    TORCH_CHECK(values[i].device() == device && indices[i].device() == device, what, ": every tensor must be on ",
                device, " (row ", msg_num(i), ")");
    TORCH_CHECK(values[i].scalar_type() == dtype && indices[i].scalar_type() == index_type, what,
                ": values and indices must each share one dtype (row ", msg_num(i), ")");
    TORCH_CHECK(values[i].numel() == k && indices[i].numel() == k, what, ": every row must have ", msg_num(k),
                " entries (row ", msg_num(i), ")");
  }
  at::Tensor new_indices = at::empty({L, k}, indices[0].options());
  at::Tensor order = at::empty({L, k}, regrown.options());
  if (k == 0) return {new_indices, order};
  const c10::cuda::CUDAGuard guard(device);
  if (n == 0) {  // nothing leaves: the rows as they are
    new_indices.copy_(at::stack(indices));
    order.copy_(at::arange(k, regrown.options()).expand({L, k}));
    return {new_indices, order};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto int_options = regrown.options().dtype(at::kInt);
  SPIEL_DISPATCH_FLOAT(dtype, T, what, [&] {
    SPIEL_DISPATCH_INDEX(index_type, IdxT, what, [&] {
      for (int64_t first = 0; first < L; first += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, L - first));
        Rows rows;
        for (int r = 0; r < count; ++r) {
          rows.values[r] = values[first + r].data_ptr();
          rows.indices[r] = indices[first + r].data_ptr();
        }
        launch_group<T, IdxT>(rows, count, k, n, regrown.data_ptr<int64_t>() + first * n,
                              new_indices.data_ptr<IdxT>() + first * k, order.data_ptr<int64_t>() + first * k,
                              int_options, stream);
      }
    });
  });
  return {new_indices, order};
}

}  // namespace spiel
