// sm90a (Hopper) dense-tile SDDMM: the requested entries of C = A^T B (A = grad_output [T, rows], B = input
// [T, cols], both 16-bit, T the reduction) computed by wgmma over 128 x 256 output tiles and written from the
// accumulators; nothing of C leaves the SM but the requested entries.
//
// Why a hand-written kernel: the WMMA (mma.sync) tiles reach ~150-500 TFLOP/s, cuBLAS ~700, so the dense_tile
// strategy lost to cuBLAS bands + gather at every point where dense work is needed (benchmarks/NOTES.md,
// sessions 8-11). This one runs the mainloop the way Hopper GEMMs do:
//   * persistent CTAs (one per SM), 384 threads, in clusters of 2: a cluster takes two vertically adjacent
//     tiles, which share their B boxes (each CTA loads half of them, multicast to both): without it the
//     kernel was L2-bandwidth-bound (session 11, call 4's ncu);
//   * warp 0 streams [64-token x 64-feature] boxes of A and B into a 4-stage ring with TMA (128-byte swizzle,
//     zero fill past T / rows / cols), signalling full/empty mbarriers (empty: both CTAs' consumers);
//   * each consumer warpgroup owns 64 rows x 256 cols: m64n256k16 wgmma, both operands MN-major (features
//     contiguous, as they lie in memory: no transpose anywhere), fp32 accumulators in registers;
//   * warps 1-3 build the coming units' entry bitmaps (1 bit per element of the 128 x 256 tile, per-word prefix
//     counts, output positions by rank) and unit descriptors into double buffers while the mainloop runs, so the
//     epilogue tests bits of the registers it holds, stages values in shared memory by rank and writes them
//     out with consecutive threads.
// Tiles are grouped 8 tile rows at a time for L2 reuse. Deterministic: each entry is written once per T split
// (the same fixed-order reduce as the other strategies), or, for the last partial wave's tiles run as two T
// halves, added twice into a zeroed output (0 + a + b == 0 + b + a exactly).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace spiel {
namespace sm90 {

constexpr int kBM = 128;                       // tile rows (output features), 2 consumer warpgroups x 64
constexpr int kBN = 256;                       // tile cols (input features): two plan tiles of 128
constexpr int kBK = 64;                        // tokens per pipeline stage
constexpr int kStages = 4;
constexpr int kThreads = 384;
constexpr int kBoxElems = 64;                  // features per TMA box: one 128-byte swizzle row
constexpr int kBoxBytes = kBK * 128;           // [64 tokens][64 features] of 16-bit = 8 KiB
constexpr int kStageABytes = (kBM / kBoxElems) * kBoxBytes;  // 16 KiB
constexpr int kStageBBytes = (kBN / kBoxElems) * kBoxBytes;  // 32 KiB
constexpr int kStageBytes = kStageABytes + kStageBBytes;
constexpr int kWordsPerRow = kBN / 32;         // bitmap words per tile row
constexpr int kBitmapWords = kBM * kWordsPerRow;
constexpr int kBuilders = 96;                  // producer warps 1-3
constexpr int kBuildUnroll = 8;                // entries in flight per builder thread (independent loads)
constexpr int kDestCap = 768;                  // entries per half tile staged in shared memory (more: direct)
constexpr int kGroupRows = 8;                  // tile rows per L2 group
constexpr int kCluster = 2;                    // CTAs per cluster: two tile rows share each B box (multicast)
// dynamic shared memory: operands | bitmaps[2] | prefix counts[2] | output positions[2][2] | staged results |
// row runs[2] | mbarriers | unit descriptors[2], +1 KiB to align the base (230,576 of the 232,448 bytes an H100
// CTA may have)
constexpr int kOffBitmap = kStages * kStageBytes;
constexpr int kOffPrefix = kOffBitmap + 2 * kBitmapWords * 4;
constexpr int kOffDest = kOffPrefix + 2 * kBitmapWords * 2;
constexpr int kOffStage = kOffDest + 2 * 2 * kDestCap * 4;  // [2 halves][kDestCap] fp32 results
constexpr int kOffRows = kOffStage + 2 * kDestCap * 4;  // [2 buffers][2][kBM] row runs (row-plan mode)
constexpr int kOffBar = kOffRows + 2 * 2 * kBM * 4;
constexpr int kNumBars = 2 * kStages + 6;
constexpr int kOffInfo = kOffBar + kNumBars * 8;  // [2] UnitInfo (8 ints each)
constexpr int kSmemBytes = kOffInfo + 2 * 8 * 4 + 1024;
static_assert(kSmemBytes <= 232448, "sm90 shared memory per CTA");

template <typename IdxT>
struct Args {
  const IdxT* indices;
  const int* perm;       // entry positions in (tile, row, col) order
  const int* tile_ptr;   // per listed tile: its range in perm order
  const int* tile_slot;  // tile id -> listed slot or -1
  // Row-plan mode (row_ptr != nullptr; no plan sections, indices sorted): row r's entries are indices
  // [row_ptr[r], row_ptr[r + 1]); a tile row's entries are one run of it, and an entry's output position is
  // its index in the list.
  const int* row_ptr;
  int64_t n_out;
  const int* rowmap;     // actual -> compact row (when use_rmap)
  const int* colmap;
  int use_rmap, use_cmap;
  int idx32;             // every flat index and n_in fit 32 bits: 32-bit division
  int ntc;               // plan tile columns (128 wide), for tile ids
  int n_tr, n_tc;        // 128 x 256 tile grid over the (compacted) operands [rows, cols]
  int splits, t_split, T;
  // Work units (one per cluster at a time): tile pairs [0, n_whole) x `splits` T splits, then pairs
  // [n_whole, n_whole + tail) in two T halves (split at t_half) that the last, partial wave of clusters shares.
  // Two halves add into a zeroed output with atomics, which is still deterministic: 0 + a + b == 0 + b + a
  // exactly in IEEE arithmetic.
  int n_whole, tail, t_half;
  int64_t n_in, k;
  float* dst;            // out[k] (splits == 1: dst[perm[j]]) or part[splits, k] (dst[s * k + j])
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPIEL_SM90A_DEVICE 1
#endif

#ifdef SPIEL_SM90A_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
// waits until the phase of parity `parity` has completed
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1, 1000000;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(x), "r"(y)
      : "memory");
}
// the same box multicast into the same smem offset of every CTA in `mask`, completing bytes on the mbarrier
// at the same offset in each of them
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(x), "r"(y), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// arrive on the mbarrier at the same smem offset in CTA `rank` of the cluster (this one included)
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_u32(bar)),
      "r"(rank)
      : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
// wgmma shared-memory descriptor, 128-byte swizzle. MN-major operand: LBO = bytes between 64-feature boxes,
// SBO = bytes between groups of 8 tokens (8 swizzled 128-byte rows).
__device__ __forceinline__ uint64_t make_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = smem_u32(p);
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t(1) << 62);
}
// D[64 x 256] (fp32, the m64nNk16 accumulator fragment) += A[64 x 16] * B[16 x 256], both operands MN-major
// in shared memory (imm-trans-a = imm-trans-b = 1), described by wgmma descriptors. TY: bf16 or f16.
#define SPIEL_WGMMA_M64N256K16(TY, d, desc_a, desc_b)                                                          \
  asm volatile(                                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                              \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." #TY "." #TY " "                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                        \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                               \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                               \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                               \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                               \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                               \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                   \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "              \
      "%128, %129, p, 1, 1, 1, 1;\n}\n"                                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
      : "l"(desc_a), "l"(desc_b))

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// keeps the compiler from moving accumulator registers while a wgmma may still write them
__device__ __forceinline__ void fence_operands(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}

template <typename T>
__device__ __forceinline__ void mma_k16(float (&d)[128], uint64_t da, uint64_t db);
template <>
__device__ __forceinline__ void mma_k16<__nv_bfloat16>(float (&d)[128], uint64_t da, uint64_t db) {
  SPIEL_WGMMA_M64N256K16(bf16, d, da, db);
}
template <>
__device__ __forceinline__ void mma_k16<__half>(float (&d)[128], uint64_t da, uint64_t db) {
  SPIEL_WGMMA_M64N256K16(f16, d, da, db);
}
#endif  // SPIEL_SM90A_DEVICE

// The u-th work unit of a cluster: a pair of vertically adjacent 128 x 256 tiles (tile rows 2 pr and 2 pr + 1,
// one per CTA of the cluster; pair rows grouped for L2 reuse) and its token range [t0, t1). `mode` 0: plain
// store, 1: partial sum of T split `split` (part buffer), 2: tail half (atomic add). False when all four plan
// tiles of the pair are empty: both CTAs skip it together (they share the B loads).
struct Unit {
  int tr, tc, t0, t1, mode, split, slot0, slot1;
};
// What the consumers need of a unit, published by the builder warps through shared memory (nk == 0: no more
// units), so the consumers never wait on global loads between two units' mainloops.
struct UnitInfo {
  int nk, mode, split, base0, base1, pad0, pad1, pad2;
};
template <typename IdxT>
__device__ __forceinline__ void plan_slots(const Args<IdxT>& a, int tr, int tc, int& slot0, int& slot1) {
  if (tr >= a.n_tr) {  // the phantom second tile of an odd tile-row count
    slot0 = slot1 = -1;
    return;
  }
  if (a.row_ptr != nullptr) {  // row-plan mode: every tile is worked (random masks leave none empty)
    slot0 = slot1 = 0;
    return;
  }
  const int id = tr * a.ntc + 2 * tc;
  slot0 = __ldg(a.tile_slot + id);
  slot1 = (2 * tc + 1 < a.ntc) ? __ldg(a.tile_slot + id + 1) : -1;
}
template <typename IdxT>
__device__ __forceinline__ bool unit_at(const Args<IdxT>& a, int u, uint32_t rank, Unit& w) {
  int pair;
  const int n_split_units = a.n_whole * a.splits;
  if (u < n_split_units) {
    pair = u / a.splits;
    w.split = u - pair * a.splits;
    w.t0 = w.split * a.t_split;
    w.t1 = min(a.T, w.t0 + a.t_split);
    w.mode = a.splits > 1 ? 1 : 0;
  } else {
    const int v = u - n_split_units;
    pair = a.n_whole + v / 2;
    w.split = v % 2;
    w.t0 = w.split ? a.t_half : 0;
    w.t1 = w.split ? a.T : a.t_half;
    w.mode = 2;
  }
  const int n_pr = (a.n_tr + kCluster - 1) / kCluster;
  const int per_group = (kGroupRows / kCluster) * a.n_tc;
  const int g = pair / per_group;
  const int first = g * (kGroupRows / kCluster);
  const int rows_in_group = min(n_pr - first, kGroupRows / kCluster);
  const int in_group = pair - g * per_group;
  const int pr = first + in_group % rows_in_group;
  w.tc = in_group / rows_in_group;
  w.tr = kCluster * pr + static_cast<int>(rank);
  plan_slots(a, w.tr, w.tc, w.slot0, w.slot1);
  int other0, other1;
  plan_slots(a, kCluster * pr + static_cast<int>(rank ^ 1), w.tc, other0, other1);
  return w.slot0 >= 0 || w.slot1 >= 0 || other0 >= 0 || other1 >= 0;
}

// Builder step: set the bitmap bit of plan entries [p0, p1) (a plan tile's list, in (row, col) order) and
// cache their output positions by rank. U entries per thread are in flight at once: the perm -> indices
// (-> row/col map) loads form a dependent chain, so independent chains hide its latency. I: the width of the
// flat-index arithmetic (32 bits when out * in fits).
template <int U, typename I, typename IdxT>
__device__ __forceinline__ void mark_entries(const Args<IdxT>& a, uint32_t* bm, int* dest, int p0, int p1, int bt,
                                             int64_t r0, int64_t c0) {
  for (int j0 = p0 + bt; j0 < p1; j0 += U * kBuilders) {
    int e[U];
    I idx[U];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int j = j0 + q * kBuilders;
      e[q] = j < p1 ? __ldg(a.perm + j) : -1;
    }
#pragma unroll
    for (int q = 0; q < U; ++q) idx[q] = e[q] >= 0 ? static_cast<I>(__ldg(a.indices + e[q])) : I(0);
#pragma unroll
    for (int q = 0; q < U; ++q) {
      if (e[q] < 0) continue;
      const I n_in = static_cast<I>(a.n_in);
      const I rq = idx[q] / n_in;
      int64_t r = static_cast<int64_t>(rq), c = static_cast<int64_t>(idx[q] - rq * n_in);
      if (a.use_rmap) r = __ldg(a.rowmap + r);
      if (a.use_cmap) c = __ldg(a.colmap + c);
      const int lr = static_cast<int>(r - r0), lc = static_cast<int>(c - c0);
      atomicOr(bm + lr * kWordsPerRow + (lc >> 5), 1u << (lc & 31));
      const int rank = j0 + q * kBuilders - p0;
      if (rank < kDestCap) dest[rank] = e[q];
    }
  }
}

// Row-plan mode, builder pass 1: the tile row's entries are the run of sorted indices in [row * in + c0,
// row * in + c0 + 256). The index list sits in an L2 that the operand traffic keeps busy (~1 us per dependent
// load, estimated from the timings; a binary search and an entry-by-entry scan made the builders, not the tensor cores, set the pace at
// T = 2048), so every step issues P independent loads (8 int32 or 4 int64 indices: the same registers): a
// (P + 1)-ary search for the run's start inside the row (2-3 rounds for rows of ~100-300 entries), then P-wide
// chunks that set the bits until an entry passes the tile. (Two rows at once would take fewer rounds but
// spill: 168 registers are the kernel's cap.) runs[lr] / runs[kBM + lr] = the run's [lo, hi) in the list.

// The p-th of P probes splitting (s, s + n) into P + 1 parts: strictly increasing in p when n > P.
template <int P>
__device__ __forceinline__ int probe_at(int s, int n, int p) {
  return s + static_cast<int>((static_cast<int64_t>(p + 1) * n) / (P + 1));
}

template <typename IdxT>
__device__ __forceinline__ void mark_row_runs(const Args<IdxT>& a, uint32_t* bm, int* runs, int bt, int64_t r0,
                                              int64_t c0) {
  constexpr int P = sizeof(IdxT) == 4 ? 8 : 4;
#pragma unroll 1
  for (int lr = bt; lr < kBM; lr += kBuilders) {
    const int64_t row = r0 + lr, first = row * a.n_in + c0, last = first + kBN;
    int s = 0, e = 0;
    if (row < a.n_out) {  // clamped to [0, k]: a row plan of another index set gives wrong sums, never a stray read
      const int k = static_cast<int>(a.k);
      e = min(max(__ldg(a.row_ptr + row + 1), 0), k);
      s = min(max(__ldg(a.row_ptr + row), 0), e);
    }
    const int end = e;
    // lower bound of `first` in [s, end): always inside [s, e]
    while (e - s > P) {
      const int n = e - s;
      IdxT v[P];
#pragma unroll
      for (int p = 0; p < P; ++p) v[p] = __ldg(a.indices + probe_at<P>(s, n, p));
      int below = 0;  // probes < first: a prefix, the list being sorted
#pragma unroll
      for (int p = 0; p < P; ++p) below += static_cast<int64_t>(v[p]) < first;
      e = below < P ? probe_at<P>(s, n, below) : e;
      s = below > 0 ? probe_at<P>(s, n, below - 1) + 1 : s;
    }
    // from s: entries < first advance lo, entries < last are the tile row's (bits set); an entry past the tile
    // or the row's end stops
    int lo = s, hi = s;
    bool open = s < end;
    while (open) {
      IdxT v[P];
#pragma unroll
      for (int p = 0; p < P; ++p) v[p] = hi + p < end ? __ldg(a.indices + hi + p) : IdxT(0);
      const int base = hi;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t x = static_cast<int64_t>(v[p]);
        if (base + p >= end || x >= last) {
          open = false;
        } else if (open) {  // sorted: nothing after a stop is taken
          if (x < first) {
            ++lo;
          } else {
            const int lc = static_cast<int>(x - first);
            bm[lr * kWordsPerRow + (lc >> 5)] |= 1u << (lc & 31);  // the row's words are this thread's alone
          }
          ++hi;
        }
      }
    }
    runs[lr] = lo;
    runs[kBM + lr] = hi;
  }
}

// Row-plan mode, builder pass 2: each entry's output position (its index in the list: the row run's start plus
// its place in the row) stored by its rank in its half tile, as the plan mode's perm would give it. Shared
// memory only: the bitmap holds the columns.
__device__ __forceinline__ void cache_row_positions(const uint32_t* bm, const uint16_t* pre, const int* runs,
                                                    int* dest, int bt) {
  for (int lr = bt; lr < kBM; lr += kBuilders) {
    int j = runs[lr];
#pragma unroll
    for (int wd = 0; wd < kWordsPerRow; ++wd) {
      uint32_t word = bm[lr * kWordsPerRow + wd];
      int rank = pre[lr * kWordsPerRow + wd];
      int* half = dest + (wd >> 2) * kDestCap;  // words 0-3: left half (cols 0-127), 4-7: right half
      while (word != 0u) {
        if (rank < kDestCap) half[rank] = j;
        ++rank;
        ++j;
        word &= word - 1u;
      }
    }
  }
}

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kThreads, 1)  // launched in clusters of kCluster CTAs (cudaLaunchKernelEx)
    sddmm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                       const Args<IdxT> a) {
#ifdef SPIEL_SM90A_DEVICE
  extern __shared__ unsigned char smem_raw[];
  // the 128-byte swizzle pattern repeats every 1 KiB: stage buffers start 1 KiB-aligned
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint32_t* bitmaps = reinterpret_cast<uint32_t*>(smem + kOffBitmap);
  uint16_t* prefixes = reinterpret_cast<uint16_t*>(smem + kOffPrefix);
  int* dests = reinterpret_cast<int*>(smem + kOffDest);  // [2 buffers][2 halves][kDestCap] output positions
  float* staged = reinterpret_cast<float*>(smem + kOffStage);  // [2 halves][kDestCap] results by rank
  int* row_runs = reinterpret_cast<int*>(smem + kOffRows);  // [2 buffers][lo, hi][kBM] (row-plan mode)
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kOffBar);
  uint64_t* full = bars;                   // [kStages] TMA bytes landed
  uint64_t* empty = bars + kStages;        // [kStages] both consumer warpgroups done reading
  uint64_t* bm_full = bars + 2 * kStages;  // [2] bitmap built
  uint64_t* bm_empty = bm_full + 2;        // [2] bitmap and unit descriptor consumed
  uint64_t* info_full = bm_full + 4;       // [2] unit descriptor written
  UnitInfo* infos = reinterpret_cast<UnitInfo*>(smem + kOffInfo);
  auto stage_a = [&](int s) { return smem + s * kStageBytes; };
  auto stage_b = [&](int s) { return smem + s * kStageBytes + kStageABytes; };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, 2 * kCluster);  // both consumer warpgroups of both CTAs (the B boxes are shared)
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(bm_full + b, kBuilders);
      mbar_init(bm_empty + b, 2);
      mbar_init(info_full + b, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();  // the partner's barriers are initialized before any multicast or remote arrive

  const uint32_t rank = cluster_rank();
  const int cluster = blockIdx.x / kCluster, n_clusters = gridDim.x / kCluster;
  const int n_units = a.n_whole * a.splits + 2 * a.tail;
  const int wg = threadIdx.x / 128;
  Unit w;

  if (wg == 0) {
    setmaxnreg_dec<64>();  // 128 x 64 + 256 x 216 <= 64 Ki registers
    const int warp = threadIdx.x / 32;
    if (warp == 0) {
      if (threadIdx.x == 0) {  // TMA producer
        int it = 0;
        for (int u = cluster; u < n_units; u += n_clusters) {
          if (!unit_at(a, u, rank, w)) continue;
          const int nk = (w.t1 - w.t0 + kBK - 1) / kBK;
          for (int kb = 0; kb < nk; ++kb, ++it) {
            const int s = it % kStages;
            mbar_wait(empty + s, ((it / kStages) & 1) ^ 1);
            mbar_expect_tx(full + s, kStageBytes);
            // a box past t1 inside T would add the next range's tokens: ranges end at T or at a multiple of kBK
            const int y = w.t0 + kb * kBK;
#pragma unroll
            for (int b = 0; b < kBM / kBoxElems; ++b)
              tma_load_2d(stage_a(s) + b * kBoxBytes, &map_a, full + s, w.tr * kBM + b * kBoxElems, y);
            // this CTA's half of the B boxes, multicast to both CTAs (each full barrier expects all 48 KiB)
#pragma unroll
            for (int b = rank * (kBN / kBoxElems / kCluster); b < (rank + 1) * (kBN / kBoxElems / kCluster); ++b)
              tma_load_2d_multicast(stage_b(s) + b * kBoxBytes, &map_b, full + s, w.tc * kBN + b * kBoxElems, y,
                                    static_cast<uint16_t>((1u << kCluster) - 1));
          }
        }
      }
    } else {  // bitmap builders: warps 1-3
      const int bt = threadIdx.x - 32;
      const int bwarp = bt / 32, lane = bt % 32;
      int ui = 0;
      for (int u = cluster; u < n_units; u += n_clusters) {
        if (!unit_at(a, u, rank, w)) continue;
        const int buf = ui & 1;
        mbar_wait(bm_empty + buf, ((ui >> 1) & 1) ^ 1);
        if (bt == 0) {
          UnitInfo& in = infos[buf];
          in.nk = (w.t1 - w.t0 + kBK - 1) / kBK;
          in.mode = w.mode;
          in.split = w.split;
          const bool planned = a.row_ptr == nullptr;  // row-plan mode has no tile list (bases unused)
          in.base0 = planned && w.slot0 >= 0 ? __ldg(a.tile_ptr + w.slot0) : 0;
          in.base1 = planned && w.slot1 >= 0 ? __ldg(a.tile_ptr + w.slot1) : 0;
          mbar_arrive(info_full + buf);
        }
        uint32_t* bm = bitmaps + buf * kBitmapWords;
        uint16_t* pre = prefixes + buf * kBitmapWords;
        for (int i = bt; i < kBitmapWords; i += kBuilders) bm[i] = 0u;
        named_barrier(1, kBuilders);
        const int64_t r0 = int64_t(w.tr) * kBM, c0 = int64_t(w.tc) * kBN;
        int* runs = row_runs + buf * 2 * kBM;
        if (a.row_ptr != nullptr) mark_row_runs(a, bm, runs, bt, r0, c0);
        for (int h = 0; h < 2 && a.row_ptr == nullptr; ++h) {
          const int slot = h ? w.slot1 : w.slot0;
          if (slot < 0) continue;
          const int p0 = __ldg(a.tile_ptr + slot), p1 = __ldg(a.tile_ptr + slot + 1);
          int* dest = dests + (buf * 2 + h) * kDestCap;
          if (a.idx32) {
            mark_entries<kBuildUnroll, uint32_t>(a, bm, dest, p0, p1, bt, r0, c0);
          } else {
            mark_entries<2, int64_t>(a, bm, dest, p0, p1, bt, r0, c0);
          }
        }
        named_barrier(1, kBuilders);
        if (bwarp < 2) {  // warp 1 ranks the left half (plan tile 2 tc), warp 2 the right half (2 tc + 1)
          // rank order of a half = its plan tile's entry order: (row, col), i.e. its 512 words row-major.
          // 16 steps of 32 consecutive words (8 rows x 4), lane = word within the step: conflict-free reads
          const int h = bwarp;
          int base = 0;
#pragma unroll 4
          for (int step = 0; step < kBM / 8; ++step) {
            const int wd = (step * 8 + lane / 4) * kWordsPerRow + h * 4 + lane % 4;
            const int cnt = __popc(bm[wd]);
            int incl = cnt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
              const int v = __shfl_up_sync(0xffffffffu, incl, o);
              if (lane >= o) incl += v;
            }
            pre[wd] = static_cast<uint16_t>(base + incl - cnt);
            base += __shfl_sync(0xffffffffu, incl, 31);
          }
        }
        if (a.row_ptr != nullptr) {  // output positions by rank, now that the ranks are known
          named_barrier(1, kBuilders);
          cache_row_positions(bm, pre, runs, dests + buf * 2 * kDestCap, bt);
        }
        mbar_arrive(bm_full + buf);
        ++ui;
      }
      const int buf = ui & 1;  // no more units
      mbar_wait(bm_empty + buf, ((ui >> 1) & 1) ^ 1);
      if (bt == 0) {
        infos[buf].nk = 0;
        mbar_arrive(info_full + buf);
      }
    }
  } else {  // consumers: warpgroup cw owns tile rows [64 cw, 64 cw + 64)
    setmaxnreg_inc<216>();
    const int cw = wg - 1;
    const int lt = threadIdx.x - 128 * wg;
    const int row_in = cw * 64 + (lt / 32) * 16 + (lt % 32) / 4;  // + 8 for the second row
    const int cq = lt % 4;
    float acc[128];
    int it = 0;
    for (int ui = 0;; ++ui) {
      const int buf = ui & 1;
      mbar_wait(info_full + buf, (ui >> 1) & 1);
      const UnitInfo in = infos[buf];
      if (in.nk == 0) break;
      const int nk = in.nk;
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.f;
      int prev = -1;
      for (int kb = 0; kb < nk; ++kb, ++it) {
        const int s = it % kStages;
        mbar_wait(full + s, (it / kStages) & 1);
        fence_operands(acc);
        wgmma_fence();
        const unsigned char* pa = stage_a(s) + cw * kBoxBytes;
        const unsigned char* pb = stage_b(s);
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
          // 16 tokens = 16 swizzled 128-byte rows = 2 KiB into each box
          mma_k16<T>(acc, make_desc(pa + kk * 2048, kBoxBytes, 1024), make_desc(pb + kk * 2048, kBoxBytes, 1024));
        }
        wgmma_commit();
        fence_operands(acc);
        wgmma_wait<1>();  // the previous k-block's group is done: its stage can be refilled
        if (prev >= 0 && lt < kCluster) mbar_arrive_cluster(empty + prev, lt);  // both CTAs' producers
        prev = s;
      }
      wgmma_wait<0>();
      fence_operands(acc);
      if (lt < kCluster) mbar_arrive_cluster(empty + prev, lt);

      // epilogue: entry `rank` of plan tile (2 tc + h)'s list is C[row, col] where bit col of row is set
      mbar_wait(bm_full + buf, (ui >> 1) & 1);
      const uint32_t* bm = bitmaps + buf * kBitmapWords;
      const uint16_t* pre = prefixes + buf * kBitmapWords;
      const int* dest = dests + buf * 2 * kDestCap;
      const int base0 = in.base0, base1 = in.base1, mode = in.mode;
      const int64_t part = static_cast<int64_t>(in.split) * a.k;
      // phase 1: every requested entry this thread holds goes to staged[half][rank] in shared memory, with no
      // dependent global access and small, unrolled code: a loop over the set bits (values picked by selects) was
      // slow at 2.4%, and so were per-entry global paths in the unrolled checks (session 11, calls 8-11). At ~2%
      // density nearly every word holds some lane's bit, so every warp runs every word's checks and their
      // instruction count is the cost: per block of 8 columns one popcount gives the rank of the lane's first
      // column and the second adds its bit (independent blocks: a rank carried along the word was slower,
      // session 17), and the staging-capacity test is one per word (conservative: a false alarm only sends this
      // thread through the overflow loop below, which skips ranks inside the capacity).
      bool overflow = false;
      uint32_t below[4];  // the word's columns before this lane's pair in block jj: 8 jj + 2 cq of them
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) below[jj] = (1u << (8 * jj + 2 * cq)) - 1u;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int row = row_in + 8 * rr;
#pragma unroll
        for (int wd = 0; wd < kWordsPerRow; ++wd) {  // one bitmap word = 4 n8 blocks of the fragment
          const uint32_t word = bm[row * kWordsPerRow + wd];
          const uint32_t mine = word >> (2 * cq);  // bit 8 jj + e: this lane's column 8 jj + 2 cq + e of the word
          if ((mine & 0x03030303u) == 0u) continue;
          const int first = pre[row * kWordsPerRow + wd];
          float* out_half = staged + (wd >> 2) * kDestCap;
          overflow |= first + __popc(word) > kDestCap;  // a rank of this word may be past the capacity
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int r0 = first + __popc(word & below[jj]);
            const bool b0 = (mine >> (8 * jj)) & 1u, b1 = (mine >> (8 * jj + 1)) & 1u;
            const int r1 = r0 + (b0 ? 1 : 0);
            if (b0 && r0 < kDestCap) out_half[r0] = acc[4 * (4 * wd + jj) + 2 * rr];
            if (b1 && r1 < kDestCap) out_half[r1] = acc[4 * (4 * wd + jj) + 2 * rr + 1];
          }
        }
      }
      if (overflow) {  // rare (> 4.7% of a half tile requested): the entries past the staging capacity, by
                       // a loop over the set bits (compact code; values picked from registers with selects)
        const bool by_rows = a.row_ptr != nullptr;
        const int* runs = row_runs + buf * 2 * kBM;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int row = row_in + 8 * rr;
          int before = by_rows ? runs[row] : 0;  // row-plan mode: list index of the row's next entry
#pragma unroll
          for (int wd = 0; wd < kWordsPerRow; ++wd) {
            const uint32_t word = bm[row * kWordsPerRow + wd];
            uint32_t mine = (word >> (2 * cq)) & 0x03030303u;
            const int first = pre[row * kWordsPerRow + wd];
            const int base = (wd >> 2) ? base1 : base0;
            const int k0 = 4 * (4 * wd) + 2 * rr;
            const int word_start = before;
            before += __popc(word);
            while (mine != 0u) {
              const int b = __ffs(mine) - 1;  // 8 jj + e
              mine &= mine - 1u;
              const int rank = first + __popc(word & ((1u << (b + 2 * cq)) - 1u));
              if (rank < kDestCap) continue;
              const int jj = b >> 3, e = b & 1;
              const float c0 = e ? acc[k0 + 1] : acc[k0];
              const float c1 = e ? acc[k0 + 5] : acc[k0 + 4];
              const float c2 = e ? acc[k0 + 9] : acc[k0 + 8];
              const float c3 = e ? acc[k0 + 13] : acc[k0 + 12];
              const float v = jj == 0 ? c0 : jj == 1 ? c1 : jj == 2 ? c2 : c3;
              // plan mode: position `base + rank` in perm order; row-plan mode: the entry's list index
              const int pos = by_rows ? word_start + __popc(word & ((1u << (b + 2 * cq)) - 1u)) : base + rank;
              const int out = by_rows ? pos : __ldg(a.perm + pos);
              if (mode == 1) {
                a.dst[part + pos] = v;
              } else if (mode == 0) {
                a.dst[out] = v;
              } else {
                atomicAdd(a.dst + out, v);
              }
            }
          }
        }
      }
      named_barrier(2 + cw, 128);
      // phase 2: this warpgroup's rank range of each half (its 64 rows), written out by consecutive threads
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lo = pre[(64 * cw) * kWordsPerRow + 4 * h];
        const int last = (64 * cw + 63) * kWordsPerRow + 4 * h + 3;
        const int hi = min(pre[last] + __popc(bm[last]), kDestCap);
        const int base = h ? base1 : base0;
        for (int j = lo + lt; j < hi; j += 128) {
          const float v = staged[h * kDestCap + j];
          if (mode == 1) {  // plan mode: perm order; row-plan mode: list index (the reduce maps both)
            a.dst[part + (a.row_ptr != nullptr ? dest[h * kDestCap + j] : base + j)] = v;
          } else if (mode == 0) {
            a.dst[dest[h * kDestCap + j]] = v;
          } else {
            atomicAdd(a.dst + dest[h * kDestCap + j], v);
          }
        }
      }
      // both warpgroups: the staging buffer and this unit's bitmap are free again
      named_barrier(4, 256);
      if (lt == 0) mbar_arrive(bm_empty + buf);
    }
  }
  // neither CTA may exit while its partner can still multicast into it or arrive on its barriers
  cluster_sync();
#endif  // SPIEL_SM90A_DEVICE
}

}  // namespace sm90
}  // namespace spiel
