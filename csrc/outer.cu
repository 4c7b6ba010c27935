// The threshold multisection of SpIEL-MA's batched regrowth (spiel::outer_threshold; spiel/ops/outer.py has the
// contract). The torch reference runs ~15 launches per round (searchsorted over [L, sections, m] and the
// reductions around it), 150 per 7B batch of ten rounds, and the update step was host-bound on them. Here one
// launch per round and one at the end:
//   - grid (row blocks, layers); each CTA first derives its layer's interval from the previous round's counts
//     (every CTA computes the same doubles with the reference's operations, rounded one at a time, no FMA), then
//     counts the non-excluded cells above each of the round's thresholds over its 128 rows (a thread per
//     (row, threshold), 2^ceil(log2(sections + 1)) threads per row: a binary search in the descending columns
//     and one in the row's excluded keys) and adds them to the round's counters with integer atomics (the sums
//     do not depend on their order);
//   - the counters rotate over three buffers (round t reads t-1's, adds to t's, zeroes t+1's) and the intervals
//     over two, so consecutive launches never race.
// Work per round: L * m * sections searches of ~log2(n) + log2(keys per row) steps, L2/L1-resident.
#include <math_constants.h>

#include <algorithm>

#include "common.cuh"
#include "spiel.h"

namespace spiel {
namespace {

constexpr int kMaxSections = 64;  // counters per layer (sections <= 63)
constexpr int kThreads = 256;     // `lanes` threshold lanes (a power of two > sections) x 256 / lanes row groups
constexpr int kRowsPerBlock = 128;

struct Problem {
  const double* rows;       // [L, m]
  const double* cols;       // [L, n], descending
  const void* keys;         // [L, width]
  const int64_t* row_start; // [L, m + 1]
  const int64_t* need;      // [L]
  const double* hi;         // [L]
  double* interval;         // [2][L][2]: (lo, hi) by round parity
  unsigned long long* counts;  // [3][L][kMaxSections]
  double* lo_out;           // [L]
  int64_t L, m, n, width;
  int sections;
  int lanes;                // threads per row: the smallest power of two above sections
};

// The s-th threshold (0-based) of [lo, hi]: lo + (hi - lo) * ((s + 1) / (sections + 1)), as the reference.
__device__ __forceinline__ double threshold(double lo, double hi, int s, int sections) {
  const double frac = __ddiv_rn(static_cast<double>(s + 1), static_cast<double>(sections + 1));
  return __dadd_rn(lo, __dmul_rn(__dsub_rn(hi, lo), frac));
}

// The interval a round searches: round 0 starts at [0, hi]; later rounds keep the piece of the previous
// interval between the last threshold whose count reached `need` and the next one.
__device__ __forceinline__ void current_interval(const Problem& P, int64_t layer, int round, double* lo,
                                                 double* hi) {
  if (round == 0) {
    *lo = 0.0;
    *hi = P.hi[layer];
    return;
  }
  const double* prev = P.interval + (((round - 1) & 1) * P.L + layer) * 2;
  const unsigned long long* cnt = P.counts + (((round - 1) % 3) * P.L + layer) * kMaxSections;
  const double plo = prev[0], phi = prev[1];
  const int64_t need = P.need[layer];
  int j = 0;
  for (int s = 0; s < P.sections; ++s) j += static_cast<int64_t>(cnt[s]) >= need ? 1 : 0;
  *lo = j == 0 ? plo : threshold(plo, phi, j - 1, P.sections);
  *hi = j == P.sections ? phi : threshold(plo, phi, j, P.sections);
}

// #{q : cols[q] >= ratio} for descending cols (a prefix).
__device__ __forceinline__ int64_t count_at_least(const double* __restrict__ cols, int64_t n, double ratio) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(cols + mid) >= ratio) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// #{keys in [begin, end) below x} for ascending keys.
template <typename Key>
__device__ __forceinline__ int64_t count_below(const Key* __restrict__ keys, int64_t begin, int64_t end, int64_t x) {
  int64_t lo = begin, hi = end;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(__ldg(keys + mid)) < x) lo = mid + 1; else hi = mid;
  }
  return lo - begin;
}

template <typename Key>
__global__ void __launch_bounds__(kThreads) outer_threshold_round_kernel(const Problem P, int round) {
  __shared__ double mids[kMaxSections];
  __shared__ unsigned long long partial[kMaxSections];
  const int64_t layer = blockIdx.y;
  double lo, hi;
  current_interval(P, layer, round, &lo, &hi);
  const int s = threadIdx.x & (P.lanes - 1);
  if (threadIdx.x < kMaxSections) {
    mids[threadIdx.x] = threadIdx.x < P.sections ? threshold(lo, hi, threadIdx.x, P.sections) : 0.0;
    partial[threadIdx.x] = 0;
  }
  if (blockIdx.x == 0) {
    // the next round reads this interval; this round's readers use the other parity
    if (threadIdx.x == 0) {
      double* cur = P.interval + ((round & 1) * P.L + layer) * 2;
      cur[0] = lo;
      cur[1] = hi;
    }
    // counters of round + 1: those of round - 2, last read by round - 1, which has finished
    if (threadIdx.x < kMaxSections) P.counts[(((round + 1) % 3) * P.L + layer) * kMaxSections + threadIdx.x] = 0;
  }
  __syncthreads();
  if (s < P.sections) {
    const double tau = mids[s];
    const double* rows = P.rows + layer * P.m;
    const double* cols = P.cols + layer * P.n;
    const Key* keys = static_cast<const Key*>(P.keys) + layer * P.width;
    const int64_t* row_start = P.row_start + layer * (P.m + 1);
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
    const int64_t last = first + kRowsPerBlock < P.m ? first + kRowsPerBlock : P.m;
    int64_t above = 0;
    for (int64_t r = first + threadIdx.x / P.lanes; r < last; r += kThreads / P.lanes) {
      const double R = __ldg(rows + r);
      // a row without a positive score has no cell above any threshold (the reference's inf quotient)
      const double ratio = R > 0.0 ? __ddiv_rn(tau, R) : CUDART_INF;
      const int64_t p = count_at_least(cols, P.n, ratio);
      const int64_t begin = __ldg(row_start + r), end = __ldg(row_start + r + 1);
      above += p - count_below(keys, begin, end, r * P.n + p);
    }
    atomicAdd(&partial[s], static_cast<unsigned long long>(above));
  }
  __syncthreads();
  if (threadIdx.x < P.sections) {
    atomicAdd(P.counts + ((round % 3) * P.L + layer) * kMaxSections + threadIdx.x, partial[threadIdx.x]);
  }
}

// After the last round: the final interval's lower end.
__global__ void outer_threshold_finish_kernel(const Problem P, int rounds) {
  const int64_t layer = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (layer >= P.L) return;
  double lo, hi;
  current_interval(P, layer, rounds, &lo, &hi);
  P.lo_out[layer] = lo;
}

}  // namespace

at::Tensor outer_threshold_cuda(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& keys,
                                const at::Tensor& row_start, const at::Tensor& need, const at::Tensor& hi,
                                int64_t sections, int64_t rounds) {
  constexpr const char* what = "spiel::_cuda_outer_threshold";
  check_cuda_contig(rows, what, "rows");
  check_cuda_contig(cols, what, "cols");
  check_cuda_contig(keys, what, "keys");
  check_cuda_contig(row_start, what, "row_start");
  check_cuda_contig(need, what, "need");
  check_cuda_contig(hi, what, "hi");
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && keys.dim() == 2 && row_start.dim() == 2 && need.dim() == 1 &&
                  hi.dim() == 1, what, ": rows, cols, keys, row_start must be 2-D and need, hi 1-D");
  const int64_t L = rows.size(0), m = rows.size(1), n = cols.size(1), width = keys.size(1);
  TORCH_CHECK(cols.size(0) == L && keys.size(0) == L && row_start.size(0) == L && row_start.size(1) == m + 1 &&
                  need.size(0) == L && hi.size(0) == L, what,
              ": expected cols [L, n], keys [L, w], row_start [L, m + 1], need [L], hi [L] with L = ", msg_num(L),
              ", m = ", msg_num(m));
  TORCH_CHECK(rows.scalar_type() == at::kDouble && cols.scalar_type() == at::kDouble &&
                  hi.scalar_type() == at::kDouble, what, ": rows, cols and hi must be float64");
  TORCH_CHECK(row_start.scalar_type() == at::kLong && need.scalar_type() == at::kLong, what,
              ": row_start and need must be int64");
  TORCH_CHECK(keys.scalar_type() == at::kInt || keys.scalar_type() == at::kLong, what, ": keys must be int32 or int64");
  TORCH_CHECK(sections >= 1 && sections < kMaxSections, what, ": sections must be in [1, ", msg_num(kMaxSections - 1),
              "], got ", msg_num(sections));
  TORCH_CHECK(rounds >= 0 && rounds < (int64_t{1} << 20), what, ": rounds must be in [0, 2**20), got ",
              msg_num(rounds));
  TORCH_CHECK(L < 65536, what, ": at most 65535 layers per call, got ", msg_num(L));
  const auto device = rows.device();
  TORCH_CHECK(cols.device() == device && keys.device() == device && row_start.device() == device &&
                  need.device() == device && hi.device() == device, what, ": all tensors must be on one device");
  at::Tensor lo = at::zeros({L}, rows.options());
  if (L == 0 || rounds == 0) return lo;
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor interval = at::empty({2, L, 2}, rows.options());
  at::Tensor counts = at::zeros({3, L, kMaxSections}, rows.options().dtype(at::kLong));
  Problem P;
  P.rows = rows.data_ptr<double>();
  P.cols = cols.data_ptr<double>();
  P.keys = keys.data_ptr();
  P.row_start = row_start.data_ptr<int64_t>();
  P.need = need.data_ptr<int64_t>();
  P.hi = hi.data_ptr<double>();
  P.interval = interval.data_ptr<double>();
  P.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  P.lo_out = lo.data_ptr<double>();
  P.L = L;
  P.m = m;
  P.n = n;
  P.width = width;
  P.sections = static_cast<int>(sections);
  P.lanes = 2;
  while (P.lanes <= P.sections) P.lanes *= 2;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(m, kRowsPerBlock))), static_cast<unsigned>(L));
  for (int round = 0; round < rounds; ++round) {
    if (keys.scalar_type() == at::kInt) {
      outer_threshold_round_kernel<int32_t><<<grid, kThreads, 0, stream>>>(P, round);
    } else {
      outer_threshold_round_kernel<int64_t><<<grid, kThreads, 0, stream>>>(P, round);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  outer_threshold_finish_kernel<<<static_cast<unsigned>(ceil_div(L, 128)), 128, 0, stream>>>(P, static_cast<int>(rounds));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lo;
}

}  // namespace spiel
