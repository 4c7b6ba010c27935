// The delta gradient: result[j] = sum_t grad_output[t, r_j] * input[t, c_j] (fp32), r_j = idx / in,
// c_j = idx % in, for k requested flat indices (unique, any order), never forming [out, in].
//
// Three strategies share one plan (built by spiel/ops/backends/sddmm_plan.py; its layout is mirrored in
// make_layout below). The plan's length carries the strategy chosen for this backend at build time and the
// compaction levels, so the host launches without reading device memory (no sync).
//
// sparse      CTA of 512 threads (item w, T split s). An item is <= kEMax entries of one 2048 x 2048
//             superblock, sorted by (tile, row, col). Per chunk of V = 16 B / sizeof(T) tokens the CTA stages
//             grad_output[t-chunk, item rows] and input[t-chunk, item cols] *transposed* into shared memory:
//             one 16-byte row per output row / input column holding its V tokens (loads are coalesced
//             16-byte vectors along the feature axis, transposed in registers with byte permutes). The
//             staging is software-pipelined: the next chunk's loads are in flight in registers while the
//             current chunk is computed. Step i of thread t is entry i * 512 + t of the plan section `sperm`:
//             a warp's 32 lanes take 32 consecutive entries of the item's row-major order (few distinct
//             grad_output rows: shared-memory broadcasts), which the plan deals to the 4 quarter-warps against
//             bank conflicts; every step loads both 16-byte rows with no data-dependent branch, and the fp32
//             accumulators stay in registers. Rows are XOR-swizzled in 16-byte units so the transposing
//             stores are conflict-free.
// dense_tile  On sm90a (H100/H200, extension built for 9.0a, 16-bit operands with rows of 16-byte multiples):
//             the persistent wgmma kernel of sddmm_sm90.cuh (128 x 256 tiles in 2-CTA clusters sharing the
//             input boxes by TMA multicast; entries written from the accumulator registers). Elsewhere: CTA
//             (non-empty 128 x 128 tile, T split): C = A[t, rows]^T @ B[t, cols] with WMMA (bf16/fp16
//             mma.sync, fp32 accumulators), 4-stage cp.async pipeline over T, the tile stored to shared
//             memory, and only the tile's requested entries read back. A/B are grad_output/input or their
//             compacted copies (only the distinct rows/cols used; at::index_select).
// dense_blas  cuBLAS (at::mm with fp32 output) over row bands (column bands when in > out) of the
//             (compacted) operands into a bounded fp32 band buffer, then a gather of the band's entries.
// When T is split, partial sums go to part[s, position] and a reduce kernel sums them in increasing s:
// deterministic (bit-identical across runs); the wgmma kernel's tail halves add two partials into a zeroed
// output, which is deterministic too (0 + a + b == 0 + b + a). fp32 inputs always take the sparse strategy
// (exact fp32 products; the tensor-core paths would round operands to TF32).
#include <cudaTypedefs.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "spiel.h"
#include "sddmm_sm90.cuh"

namespace spiel {
namespace {

// ------------------------------------------------------------------------------------------------
// plan layout (mirrors spiel/ops/backends/sddmm_plan.py: keep in sync)
// ------------------------------------------------------------------------------------------------
constexpr int64_t kTile = 128;
constexpr int64_t kSB = 16;
constexpr int64_t kEMax = 8192;
constexpr int64_t kHdr = 32;
enum HeaderSlot { H_MAGIC = 0, H_K, H_OUT, H_IN, H_NTILES, H_NITEMS, H_NR, H_NC, H_NCTILES, H_LEVEL_R, H_LEVEL_C };
constexpr int kNLevels = 4;
constexpr int kNStrategies = 3;
enum Strategy { kSparse = 0, kDenseTile = 1, kDenseBlas = 2 };
constexpr int64_t kBandBytes = 64ll << 20;  // sddmm_plan.BAND_BYTES

struct Layout {
  int64_t ntr, ntc, nt, wmax;
  int64_t perm, sperm, tile_list, tile_ptr, tile_slot, items, rowlist, collist, rowmap, colmap, cperm, ctile_list,
      ctile_ptr, ctile_slot, base;
};

Layout make_layout(int64_t k, int64_t out, int64_t in) {
  Layout L;
  L.ntr = ceil_div(out, kTile);
  L.ntc = ceil_div(in, kTile);
  L.nt = L.ntr * L.ntc;
  L.wmax = ceil_div(L.ntr, kSB) * ceil_div(L.ntc, kSB) + k / kEMax + 1;
  int64_t off = kHdr;
  auto take = [&off](int64_t n) {
    const int64_t o = off;
    off += n;
    return o;
  };
  L.perm = take(k);
  L.sperm = take(k);
  L.tile_list = take(L.nt);
  L.tile_ptr = take(L.nt + 1);
  L.tile_slot = take(L.nt);
  L.items = take(6 * L.wmax);
  L.rowlist = take(out);
  L.collist = take(in);
  L.rowmap = take(out);
  L.colmap = take(in);
  L.cperm = take(k);
  L.ctile_list = take(L.nt);
  L.ctile_ptr = take(L.nt + 1);
  L.ctile_slot = take(L.nt);
  L.base = off;
  return L;
}

int64_t level_cap(int64_t n, int level) {
  if (level == 0) return n;
  return std::min(n, ceil_div(ceil_div(n, int64_t(1) << level), 8) * 8);
}

// T splits: about `target` CTAs over `units` independent work units, >= 256 tokens per split, at most 64;
// the split length is a multiple of `align`. Depends on shapes only (deterministic).
void choose_splits(int64_t T, int64_t units, int64_t target, int64_t align, int64_t& S, int64_t& t_split) {
  S = std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(units, 1)));
  const int64_t cap = T >= 256 ? T / 256 : 1;
  S = std::max<int64_t>(1, std::min<int64_t>({S, cap, 64}));
  t_split = ceil_div(ceil_div(T, S), align) * align;
  S = ceil_div(T, t_split);
}

// T splits of the sparse strategy. The item count is estimated from the host-known shape and k as for a
// random mask (every superblock non-empty, k spread evenly: ceil(k_sb / kEMax) items each; the exact count
// is on the device). A CTA's time is ~ its tokens, and the grid runs in waves of `slots` resident CTAs, so
// S is the fewest splits within 3% of the least waves * tokens per split (a partial-wave tail cost up to half
// the kernel with a fixed CTA target); splits keep >= 128 tokens and S <= 64.
void choose_sparse_splits(int64_t T, int64_t k, const Layout& L, int64_t slots, int64_t align, int64_t& S,
                          int64_t& t_split) {
  const int64_t n_sb = ceil_div(L.ntr, kSB) * ceil_div(L.ntc, kSB);
  const int64_t per_sb = ceil_div(k, n_sb);
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(L.wmax, n_sb * ceil_div(per_sb, kEMax)));
  const int64_t s_max = std::max<int64_t>(1, std::min<int64_t>(64, T / 128));
  auto cost = [&](int64_t s) {
    const int64_t ts = ceil_div(ceil_div(T, s), align) * align;
    return ceil_div(items * ceil_div(T, ts), slots) * ts;
  };
  int64_t best = cost(1);
  for (int64_t s = 2; s <= s_max; ++s) best = std::min(best, cost(s));
  // the fewest splits within 3% of the best: each split adds k partial sums to write and reduce
  S = 1;
  while (S < s_max && cost(S) * 100 > best * 103) ++S;
  t_split = ceil_div(ceil_div(T, S), align) * align;
  S = ceil_div(T, t_split);
}

// ------------------------------------------------------------------------------------------------
// 16 bytes of T -> V floats (exact), and an fp32 dot of V floats with 16 bytes of T, in element order
template <typename T>
struct Unpack16;
template <>
struct Unpack16<__nv_bfloat16> {
  static __device__ __forceinline__ void run(const uint4& a, float* f) {
    const uint32_t av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      f[2 * q] = __uint_as_float(av[q] << 16);
      f[2 * q + 1] = __uint_as_float(av[q] & 0xffff0000u);
    }
  }
};
template <>
struct Unpack16<__half> {
  static __device__ __forceinline__ void run(const uint4& a, float* f) {
    const uint32_t av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&av[q]));
      f[2 * q] = v.x;
      f[2 * q + 1] = v.y;
    }
  }
};
template <>
struct Unpack16<float> {
  static __device__ __forceinline__ void run(const uint4& a, float* f) {
    f[0] = __uint_as_float(a.x);
    f[1] = __uint_as_float(a.y);
    f[2] = __uint_as_float(a.z);
    f[3] = __uint_as_float(a.w);
  }
};
template <typename T>
struct DotF {
  static __device__ __forceinline__ float run(const float* g, const uint4& x, float acc) {
    constexpr int V = 16 / sizeof(T);
    float xf[V];
    Unpack16<T>::run(x, xf);
#pragma unroll
    for (int e = 0; e < V; ++e) acc = fmaf(g[e], xf[e], acc);
    return acc;
  }
};

// ------------------------------------------------------------------------------------------------
// sparse strategy
// ------------------------------------------------------------------------------------------------
constexpr int kSpThreads = 512;
constexpr int kSpEPT = 16;                     // entries per thread
constexpr int kSpGroup = 2;                    // entries per unrolled step group (ILP across independent dots)
constexpr int kSpRows = 2 * kSB * kTile;       // staged 16-byte rows: <= 2048 item rows + 2048 item cols
constexpr size_t kSpSmem = kSpRows * 16;       // 64 KiB
static_assert(kSpThreads * kSpEPT == kEMax, "sparse CTA must hold exactly one work item");
static_assert(kSpRows * 16 <= 65536, "staged byte offsets must fit 16 bits");

__device__ __forceinline__ int64_t dceil(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int swz(int row) { return row ^ ((row >> 3) & 7); }

__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// Transposing store of one staging unit: in[tt] holds V features (16 bytes) of token tt; staged row
// swz(drow + e) receives feature e of the V tokens (16 bytes). 16-bit types: one byte permute per output
// word. Rows of 8 consecutive units' threads fall in 8 distinct swizzle classes: conflict-free 16-byte stores.
template <typename T>
__device__ __forceinline__ void stage_transpose(const uint4* in, uint4* s_rows, int drow) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    uint4 o;
    if constexpr (sizeof(T) == 2) {
      const int w = e >> 1;
      const uint32_t sel = (e & 1) ? 0x7632 : 0x5410;  // (token 2m, token 2m + 1) of feature e
      o.x = __byte_perm(word(in[0], w), word(in[1], w), sel);
      o.y = __byte_perm(word(in[2], w), word(in[3], w), sel);
      o.z = __byte_perm(word(in[4], w), word(in[5], w), sel);
      o.w = __byte_perm(word(in[6], w), word(in[7], w), sel);
    } else {
      o = make_uint4(word(in[0], e), word(in[1], e), word(in[2], e), word(in[3], e));
    }
    s_rows[swz(drow + e)] = o;
  }
}

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kSpThreads, 1)
    sddmm_sparse_kernel(const T* __restrict__ G, const T* __restrict__ X, const IdxT* __restrict__ indices,
                        const int* __restrict__ header, const int* __restrict__ perm,
                        const int* __restrict__ items, int64_t Tn, int64_t n_out, int64_t n_in, int64_t k,
                        int64_t t_split, float* __restrict__ dst, bool direct, bool vec) {
  constexpr int V = Vec16<T>::N;                       // tokens per staged chunk (8 for 16-bit, 4 for fp32)
  constexpr int kUnits = kSpRows / V / kSpThreads;     // staging units per thread (1 for 16-bit, 2 for fp32)
  extern __shared__ uint4 s_rows[];
  const int w = blockIdx.x;
  if (w >= __ldg(header + H_NITEMS)) return;
  const int tid = threadIdx.x;
  const int* it = items + 6 * static_cast<int64_t>(w);
  const int64_t e_begin = __ldg(it + 0), e_end = __ldg(it + 1);
  const int64_t row0 = __ldg(it + 2), nrows = __ldg(it + 3), col0 = __ldg(it + 4), ncols = __ldg(it + 5);
  // align the staged spans to V columns (16-byte global vectors); stays inside the superblock
  const int64_t row0a = row0 / V * V, col0a = col0 / V * V;
  const int nrows_a = static_cast<int>(dceil(row0 + nrows, V) * V - row0a);
  const int ncols_a = static_cast<int>(dceil(col0 + ncols, V) * V - col0a);

  // Step i of thread t is position e_begin + i * kSpThreads + t of `sperm` (row-major inside the item, each
  // warp step's 32 entries dealt to quarter-warps against bank conflicts by the plan): a warp's grad_output
  // loads mostly hit a few staged rows (broadcasts) and the loop has no data-dependent branch (every step
  // loads both operands; the compiler interleaves the independent dots of a step group). off = byte offset
  // of the grad_output row | byte offset of the input row << 16, both swizzled; an empty step points at row
  // 0 and is dropped.
  const int n_e = static_cast<int>(e_end - e_begin);
  const int n_steps = (n_e + kSpThreads - 1) / kSpThreads;  // <= kSpEPT, uniform in the CTA
  uint32_t off[kSpEPT];
  float acc[kSpEPT];
#pragma unroll
  for (int i = 0; i < kSpEPT; ++i) {
    const int64_t j = e_begin + static_cast<int64_t>(i) * kSpThreads + tid;
    acc[i] = 0.f;
    off[i] = 0u;
    if (j < e_end) {
      const int64_t idx = static_cast<int64_t>(__ldg(indices + __ldg(perm + j)));
      const int64_t r = idx / n_in;
      const int64_t c = idx - r * n_in;
      off[i] = (static_cast<uint32_t>(swz(static_cast<int>(r - row0a))) << 4) |
               (static_cast<uint32_t>(swz(static_cast<int>(nrows_a + (c - col0a)))) << 20);
    }
  }

  const int units_g = nrows_a / V;
  const int units = units_g + ncols_a / V;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * t_split;
  const int64_t t_end = min(Tn, t_begin + t_split);
  const unsigned char* s_bytes = reinterpret_cast<const unsigned char*>(s_rows);

  // Software pipeline: the next chunk's global loads (V tokens x 16 bytes per unit, held in registers) are
  // issued before the current chunk's dot products and stored to shared memory after them, so their latency
  // hides behind the compute. A unit is V consecutive features (16 bytes) of grad_output or input.
  uint4 raw[kUnits * V];
  auto load_chunk = [&](int64_t t0) {
#pragma unroll
    for (int m = 0; m < kUnits; ++m) {
      const int u = tid + m * kSpThreads;
      if (u >= units) continue;
      const bool isg = u < units_g;
      const T* src = isg ? G : X;
      const int64_t ld = isg ? n_out : n_in;
      const int64_t col = isg ? row0a + static_cast<int64_t>(u) * V : col0a + static_cast<int64_t>(u - units_g) * V;
      if (vec && t0 + V <= t_end) {  // whole in-range chunk, 16-byte aligned operands: no per-token branch
        const T* p = src + t0 * ld + col;
#pragma unroll
        for (int tt = 0; tt < V; ++tt) raw[m * V + tt] = __ldg(reinterpret_cast<const uint4*>(p + tt * ld));
      } else {
#pragma unroll
        for (int tt = 0; tt < V; ++tt) {
          const int64_t t = t0 + tt;
          Vec16<T> v;
#pragma unroll
          for (int e = 0; e < V; ++e) v.v[e] = (t < t_end && col + e < ld) ? src[t * ld + col + e] : from_float<T>(0.f);
          raw[m * V + tt] = *reinterpret_cast<const uint4*>(&v);
        }
      }
    }
  };
  if (t_begin < t_end) load_chunk(t_begin);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += V) {
    __syncthreads();  // previous chunk consumed
#pragma unroll
    for (int m = 0; m < kUnits; ++m) {
      const int u = tid + m * kSpThreads;
      if (u < units) stage_transpose<T>(raw + m * V, s_rows, u < units_g ? u * V : nrows_a + (u - units_g) * V);
    }
    __syncthreads();
    if (t0 + V < t_end) load_chunk(t0 + V);
    // opaque per-chunk constants: decoding off[] must stay inside the loop (hoisted, the decoded offsets
    // would not fit next to acc/off and the prefetched chunk, and spill)
    uint32_t lo_mask, hi_shift;
    asm volatile("mov.u32 %0, 0xffff;\n\tmov.u32 %1, 16;" : "=r"(lo_mask), "=r"(hi_shift));
#pragma unroll
    for (int q = 0; q < kSpEPT / kSpGroup; ++q) {
      if (q * kSpGroup < n_steps) {
#pragma unroll
        for (int s = 0; s < kSpGroup; ++s) {
          const int i = q * kSpGroup + s;
          const uint4 gv = *reinterpret_cast<const uint4*>(s_bytes + (off[i] & lo_mask));
          const uint4 xv = *reinterpret_cast<const uint4*>(s_bytes + (off[i] >> hi_shift));
          float gf[V];
          Unpack16<T>::run(gv, gf);
          acc[i] = DotF<T>::run(gf, xv, acc[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kSpEPT; ++i) {
    const int64_t j = e_begin + static_cast<int64_t>(i) * kSpThreads + tid;
    if (j < e_end) {
      if (direct) {
        dst[__ldg(perm + j)] = acc[i];
      } else {
        dst[static_cast<int64_t>(blockIdx.y) * k + j] = acc[i];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dense_tile strategy (WMMA)
// ------------------------------------------------------------------------------------------------
constexpr int kTlThreads = 256;  // 8 warps: 2 (rows) x 4 (cols), each 64 x 32 of the 128 x 128 tile
constexpr int kBK = 32;          // tokens per pipeline stage
constexpr int kStages = 4;
constexpr int kLdsAB = 136;      // 128 + 8 (16-bit elements): staggers banks for the fragment loads
constexpr int kLdsC = 132;       // fp32 tile row pitch
constexpr size_t kTileSmemAB = size_t(kStages) * 2 * kBK * kLdsAB * 2;
constexpr size_t kTileSmemC = size_t(kTile) * kLdsC * 4;
constexpr size_t kTileSmem = kTileSmemAB > kTileSmemC ? kTileSmemAB : kTileSmemC;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, typename IdxT>
struct TileArgs {
  const T* A;
  const T* B;
  int64_t lda, ldb, nra, ncb;  // row pitch and valid width of each operand
  const IdxT* indices;
  const int* perm;
  const int* tlist;
  const int* tptr;
  const int* count;  // device count of non-empty tiles
  const int* rowmap;
  const int* colmap;
  bool use_rmap, use_cmap;
  int64_t Tn, n_in, k, ntc, t_split;
  float* dst;
  bool direct, vec;
};

template <typename T>
__device__ __forceinline__ void tile_load_stage(T* sA, T* sB, const T* A, const T* B, int64_t lda, int64_t ldb,
                                                int64_t nra, int64_t ncb, int64_t r0, int64_t c0, int64_t t,
                                                int64_t t1, bool vec) {
  constexpr int kChunks = kBK * (kTile / 8);  // 16-byte chunks per operand per stage
  for (int q = threadIdx.x; q < 2 * kChunks; q += kTlThreads) {
    const bool isb = q >= kChunks;
    const int qq = isb ? q - kChunks : q;
    const int row = qq / (kTile / 8);
    const int ch = qq % (kTile / 8);
    const T* src = isb ? B : A;
    const int64_t ld = isb ? ldb : lda;
    const int64_t lim = isb ? ncb : nra;
    const int64_t col = (isb ? c0 : r0) + ch * 8;
    T* d = (isb ? sB : sA) + row * kLdsAB + ch * 8;
    const int64_t tt = t + row;
    const bool ok_t = tt < t1;
    if (vec) {  // lim % 8 == 0: a chunk is wholly inside or outside
      const bool ok = ok_t && col < lim;
      cp_async16(d, ok ? static_cast<const void*>(src + tt * ld + col) : static_cast<const void*>(src), ok ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] = (ok_t && col + e < lim) ? src[tt * ld + col + e] : from_float<T>(0.f);
    }
  }
}

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kTlThreads, 2) sddmm_tile_kernel(const TileArgs<T, IdxT> a) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char s_raw[];
  const int slot = blockIdx.x;
  if (slot >= __ldg(a.count)) return;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t tile = __ldg(a.tlist + slot);
  const int64_t tr = tile / a.ntc, tc = tile - tr * a.ntc;
  const int64_t r0 = tr * kTile, c0 = tc * kTile;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * a.t_split;
  const int64_t t1 = min(a.Tn, t0 + a.t_split);
  const int nk = static_cast<int>(dceil(t1 - t0, kBK));
  T* sbase = reinterpret_cast<T*>(s_raw);
  auto sA = [&](int st) { return sbase + st * 2 * kBK * kLdsAB; };
  auto sB = [&](int st) { return sbase + st * 2 * kBK * kLdsAB + kBK * kLdsAB; };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nk) tile_load_stage(sA(st), sB(st), a.A, a.B, a.lda, a.ldb, a.nra, a.ncb, r0, c0, t0 + st * kBK, t1, a.vec);
    cp_async_commit();
  }
  for (int kk = 0; kk < nk; ++kk) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nxt = kk + kStages - 1;
    if (nxt < nk)
      tile_load_stage(sA(nxt % kStages), sB(nxt % kStages), a.A, a.B, a.lda, a.ldb, a.nra, a.ncb, r0, c0,
                      t0 + static_cast<int64_t>(nxt) * kBK, t1, a.vec);
    cp_async_commit();
    const T* pa = sA(kk % kStages);
    const T* pb = sB(kk % kStages);
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], pa + ks * kLdsAB + wm * 64 + i * 16, kLdsAB);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], pb + ks * kLdsAB + wn * 32 + j * 16, kLdsAB);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* sC = reinterpret_cast<float*>(s_raw);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 64 + i * 16) * kLdsC + wn * 32 + j * 16, acc[i][j], kLdsC,
                              wmma::mem_row_major);
  __syncthreads();
  const int64_t p0 = __ldg(a.tptr + slot), p1 = __ldg(a.tptr + slot + 1);
  for (int64_t j = p0 + tid; j < p1; j += kTlThreads) {
    const int64_t e = __ldg(a.perm + j);
    const int64_t idx = static_cast<int64_t>(__ldg(a.indices + e));
    int64_t r = idx / a.n_in;
    int64_t c = idx - r * a.n_in;
    if (a.use_rmap) r = __ldg(a.rowmap + r);
    if (a.use_cmap) c = __ldg(a.colmap + c);
    const float v = sC[(r - r0) * kLdsC + (c - c0)];
    if (a.direct) {
      a.dst[e] = v;
    } else {
      a.dst[static_cast<int64_t>(blockIdx.y) * a.k + j] = v;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// shared epilogues
// ------------------------------------------------------------------------------------------------
__global__ void sddmm_reduce_kernel(const float* __restrict__ part, const int* __restrict__ perm,
                                    float* __restrict__ out, int64_t k, int64_t S) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  float acc = 0.f;
  for (int64_t s = 0; s < S; ++s) acc += part[s * k + j];  // fixed order: deterministic
  out[perm != nullptr ? __ldg(perm + j) : j] = acc;  // no perm: partial sums in list order (row plans)
}

template <typename IdxT>
__global__ void sddmm_band_gather_kernel(const float* __restrict__ band, const IdxT* __restrict__ indices,
                                         const int* __restrict__ rowmap, const int* __restrict__ colmap,
                                         bool use_rmap, bool use_cmap, float* __restrict__ out, int64_t k,
                                         int64_t n_in, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  // band = [rows x cols] block at (r0, c0) of the (compacted) gradient, row pitch cols
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t idx = static_cast<int64_t>(__ldg(indices + j));
  int64_t r = idx / n_in;
  int64_t c = idx - r * n_in;
  if (use_rmap) r = __ldg(rowmap + r);
  if (use_cmap) c = __ldg(colmap + c);
  if (r >= r0 && r < r0 + rows && c >= c0 && c < c0 + cols) out[j] = __ldg(band + (r - r0) * cols + (c - c0));
}

// ------------------------------------------------------------------------------------------------
// host drivers
// ------------------------------------------------------------------------------------------------
struct PlanView {
  const int* base;
  Layout L;
  int strategy;
  int level_r, level_c;
  const int* at(int64_t off) const { return base + off; }
};

void run_reduce(const at::Tensor& part, const int* perm, at::Tensor& out, int64_t k, int64_t S, cudaStream_t stream) {
  const int threads = 256;
  sddmm_reduce_kernel<<<static_cast<unsigned>(ceil_div(k, threads)), threads, 0, stream>>>(
      part.data_ptr<float>(), perm, out.data_ptr<float>(), k, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_sparse(const at::Tensor& G, const at::Tensor& X, const at::Tensor& indices, const PlanView& pv,
                int64_t n_out, int64_t n_in, at::Tensor& out, cudaStream_t stream) {
  const int64_t T = G.size(0), k = indices.numel();
  const int64_t V = 16 / G.element_size();
  int64_t S, t_split;
  choose_sparse_splits(T, k, pv.L, num_sms(G.get_device()), V, S, t_split);  // one CTA per SM
  at::Tensor part;
  if (S > 1) part = at::empty({S * k}, G.options().dtype(at::kFloat));
  float* dst = S > 1 ? part.data_ptr<float>() : out.data_ptr<float>();
  const bool vec = (n_out % V == 0) && (n_in % V == 0) && is_aligned16(G.data_ptr()) && is_aligned16(X.data_ptr());
  TORCH_CHECK(pv.L.wmax < (int64_t(1) << 31), "sddmm: too many work items");
  const dim3 grid(static_cast<unsigned>(pv.L.wmax), static_cast<unsigned>(S));
  SPIEL_DISPATCH_FLOAT(G.scalar_type(), T_, "sddmm", [&] {
    SPIEL_DISPATCH_INDEX(indices.scalar_type(), I_, "sddmm indices", [&] {
      auto kern = sddmm_sparse_kernel<T_, I_>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSpSmem)));
      kern<<<grid, kSpThreads, kSpSmem, stream>>>(
          reinterpret_cast<const T_*>(G.data_ptr()), reinterpret_cast<const T_*>(X.data_ptr()),
          indices.data_ptr<I_>(), pv.at(0), pv.at(pv.L.sperm), pv.at(pv.L.items), T, n_out, n_in, k, t_split, dst,
          S == 1, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (S > 1) run_reduce(part, pv.at(pv.L.sperm), out, k, S, stream);
}

// (A, B, use_rmap, use_cmap): the operands of the dense strategies, compacted as the plan says
std::tuple<at::Tensor, at::Tensor, bool, bool> dense_operands(const at::Tensor& G, const at::Tensor& X,
                                                              const at::Tensor& plan, const PlanView* pv,
                                                              int64_t n_out, int64_t n_in) {
  at::Tensor A = G, B = X;
  bool ur = false, uc = false;
  if (pv != nullptr && pv->level_r > 0) {
    A = at::index_select(G, 1, plan.narrow(0, pv->L.rowlist, level_cap(n_out, pv->level_r)));
    ur = true;
  }
  if (pv != nullptr && pv->level_c > 0) {
    B = at::index_select(X, 1, plan.narrow(0, pv->L.collist, level_cap(n_in, pv->level_c)));
    uc = true;
  }
  return {A.contiguous(), B.contiguous(), ur, uc};
}

// ---- sm90a: the wgmma dense-tile kernel (sddmm_sm90.cuh) ----
// cuTensorMapEncodeTiled from the driver, looked up once (no libcuda link dependency)
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

// [T, width] 16-bit row-major operand as [64 tokens x 64 features] boxes with the 128-byte swizzle
CUtensorMap operand_map(const at::Tensor& op) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(op.size(1)), static_cast<cuuint64_t>(op.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(op.stride(0) * op.element_size())};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(sm90::kBoxElems), static_cast<cuuint32_t>(sm90::kBK)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, op.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      op.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "sddmm: cuTensorMapEncodeTiled failed (", msg_num(static_cast<int>(r)), ")");
  return map;
}

}  // namespace

bool sddmm_wgmma_available(int64_t device) {
#ifdef SPIEL_BUILD_SM90A
  // asked on every dense_tile call: cached per device (cudaGetDeviceProperties would cost more than a kernel)
  static std::atomic<int8_t> cache[64];  // 0 unknown, 1 yes, 2 no (zero-initialized: static storage)
  if (device < 0 || device >= 64) return false;
  const int8_t known = cache[device].load(std::memory_order_relaxed);
  if (known != 0) return known == 1;
  int major = 0, minor = 0;
  const int d = static_cast<int>(device);
  bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess &&
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  ok = ok && major == 9 && minor == 0 && tensor_map_encoder() != nullptr;
  cache[device].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
#else
  (void)device;
  return false;
#endif
}

namespace {

// TMA needs 16-byte aligned bases and row pitches; the kernel takes 16-bit operands only
bool wgmma_applies(const at::Tensor& A, const at::Tensor& B) {
  const auto st = A.scalar_type();
  if (st != at::kBFloat16 && st != at::kHalf) return false;
  if (A.size(1) % 8 != 0 || B.size(1) % 8 != 0 || !is_aligned16(A.data_ptr()) || !is_aligned16(B.data_ptr()))
    return false;
  if (A.size(0) >= (int64_t(1) << 31) || A.size(1) >= (int64_t(1) << 31) || B.size(1) >= (int64_t(1) << 31))
    return false;
  return sddmm_wgmma_available(A.get_device());
}

// Launch configuration of the wgmma kernel: `grid` CTAs in clusters of sm90::kCluster (`attr` must outlive it)
cudaLaunchConfig_t wgmma_config(unsigned grid, cudaStream_t stream, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(sm90::kThreads);
  config.dynamicSmemBytes = sm90::kSmemBytes;
  config.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = sm90::kCluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}

// Clusters of the wgmma kernel resident at once (66 on an H100 SXM: every SM holds one CTA), asked once per
// device: a persistent grid larger than this would run its last clusters after the others.
int64_t wgmma_clusters(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n > 0) return n;
  auto kern = sm90::sddmm_wgmma_kernel<__nv_bfloat16, int32_t>;  // all instances: same resources
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemBytes));
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = wgmma_config(static_cast<unsigned>(num_sms(device)), nullptr, attr);
  if (cudaOccupancyMaxActiveClusters(&n, kern, &config) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = std::max(1, num_sms(device) / sm90::kCluster);
  }
  cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// pv == nullptr: row-plan mode (row_ptr = the row plan's starts; A, B uncompacted, indices sorted)
void run_dense_tile_wgmma(const at::Tensor& A, const at::Tensor& B, const at::Tensor& indices, const PlanView* pv,
                          const int* row_ptr, bool ur, bool uc, int64_t n_out, int64_t n_in, at::Tensor& out,
                          cudaStream_t stream) {
  const int64_t T = A.size(0), k = indices.numel();
  const bool compact = ur || uc;
  const int64_t n_tr = ceil_div(A.size(1), int64_t(sm90::kBM)), n_tc = ceil_div(B.size(1), int64_t(sm90::kBN));
  // work in pairs of tile rows, one pair per cluster of two CTAs
  const int64_t n_pairs = ceil_div(n_tr, int64_t(sm90::kCluster)) * n_tc;
  TORCH_CHECK(n_pairs * 64 < (int64_t(1) << 31), "sddmm: too many tiles");
  const int64_t clusters = wgmma_clusters(A.get_device());
  int64_t S, t_split;
  choose_splits(T, n_pairs, clusters, sm90::kBK, S, t_split);
  // The last, partial wave of pairs (<= half the clusters) runs as two T halves each: e.g. 11008 x 4096 is
  // 688 pairs = 10 waves of 66 + 28, which then take 10.5 waves' time instead of 11.
  int64_t tail = 0, t_half = 0;
  if (S == 1 && n_pairs > clusters && T >= 2 * sm90::kBK) {
    const int64_t rem = n_pairs % clusters;
    if (rem > 0 && 2 * rem <= clusters) {
      tail = rem;
      t_half = ceil_div(ceil_div(T, int64_t(2)), int64_t(sm90::kBK)) * sm90::kBK;
    }
  }
  if (tail > 0) out.zero_();  // the halves add into it
  at::Tensor part;
  if (S > 1) part = at::empty({S * k}, A.options().dtype(at::kFloat));
  const CUtensorMap map_a = operand_map(A), map_b = operand_map(B);
  const int64_t units = (n_pairs - tail) * S + 2 * tail;
  const int* perm = pv ? pv->at(compact ? pv->L.cperm : pv->L.perm) : nullptr;
  SPIEL_DISPATCH_INDEX(indices.scalar_type(), I_, "sddmm indices", [&] {
    sm90::Args<I_> args;
    args.indices = indices.data_ptr<I_>();
    args.perm = perm;
    args.tile_ptr = pv ? pv->at(compact ? pv->L.ctile_ptr : pv->L.tile_ptr) : nullptr;
    args.tile_slot = pv ? pv->at(compact ? pv->L.ctile_slot : pv->L.tile_slot) : nullptr;
    args.rowmap = pv ? pv->at(pv->L.rowmap) : nullptr;
    args.colmap = pv ? pv->at(pv->L.colmap) : nullptr;
    args.row_ptr = row_ptr;
    args.n_out = n_out;
    args.use_rmap = ur;
    args.use_cmap = uc;
    args.ntc = static_cast<int>(ceil_div(n_in, kTile));
    args.n_tr = static_cast<int>(n_tr);
    args.n_tc = static_cast<int>(n_tc);
    args.idx32 = n_out * n_in <= (int64_t(1) << 32);
    args.splits = static_cast<int>(S);
    args.t_split = static_cast<int>(t_split);
    args.T = static_cast<int>(T);
    args.n_whole = static_cast<int>(n_pairs - tail);
    args.tail = static_cast<int>(tail);
    args.t_half = static_cast<int>(t_half);
    args.n_in = n_in;
    args.k = k;
    args.dst = S > 1 ? part.data_ptr<float>() : out.data_ptr<float>();
    auto launch = [&](auto tag) {
      using T_ = decltype(tag);
      auto kern = sm90::sddmm_wgmma_kernel<T_, I_>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemBytes));
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t config =
          wgmma_config(static_cast<unsigned>(sm90::kCluster * std::min<int64_t>(clusters, units)), stream, attr);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kern, map_a, map_b, args));
    };
    if (A.scalar_type() == at::kBFloat16) {
      launch(__nv_bfloat16());
    } else {
      launch(__half());
    }
  });
  if (S > 1) run_reduce(part, perm, out, k, S, stream);
}

void run_dense_tile(const at::Tensor& G, const at::Tensor& X, const at::Tensor& indices, const at::Tensor& plan,
                    const PlanView& pv, int64_t n_out, int64_t n_in, at::Tensor& out, cudaStream_t stream) {
  const int64_t T = G.size(0), k = indices.numel();
  at::Tensor A, B;
  bool ur, uc;
  std::tie(A, B, ur, uc) = dense_operands(G, X, plan, &pv, n_out, n_in);
  if (wgmma_applies(A, B)) {
    run_dense_tile_wgmma(A, B, indices, &pv, nullptr, ur, uc, n_out, n_in, out, stream);
    return;
  }
  const bool compact = ur || uc;
  const int64_t nt_bound = compact ? ceil_div(A.size(1), kTile) * ceil_div(B.size(1), kTile) : pv.L.nt;
  int64_t S, t_split;
  choose_splits(T, nt_bound, num_sms(G.get_device()), kBK, S, t_split);
  at::Tensor part;
  if (S > 1) part = at::empty({S * k}, G.options().dtype(at::kFloat));
  const int* perm = pv.at(compact ? pv.L.cperm : pv.L.perm);
  SPIEL_DISPATCH_INDEX(indices.scalar_type(), I_, "sddmm indices", [&] {
    auto launch = [&](auto tag) {
      using T_ = decltype(tag);
      TileArgs<T_, I_> args;
      args.A = reinterpret_cast<const T_*>(A.data_ptr());
      args.B = reinterpret_cast<const T_*>(B.data_ptr());
      args.lda = A.size(1);
      args.ldb = B.size(1);
      args.nra = A.size(1);
      args.ncb = B.size(1);
      args.indices = indices.data_ptr<I_>();
      args.perm = perm;
      args.tlist = pv.at(compact ? pv.L.ctile_list : pv.L.tile_list);
      args.tptr = pv.at(compact ? pv.L.ctile_ptr : pv.L.tile_ptr);
      args.count = pv.at(compact ? H_NCTILES : H_NTILES);
      args.rowmap = pv.at(pv.L.rowmap);
      args.colmap = pv.at(pv.L.colmap);
      args.use_rmap = ur;
      args.use_cmap = uc;
      args.Tn = T;
      args.n_in = n_in;
      args.k = k;
      args.ntc = pv.L.ntc;
      args.t_split = t_split;
      args.dst = S > 1 ? part.data_ptr<float>() : out.data_ptr<float>();
      args.direct = S == 1;
      args.vec = (args.lda % 8 == 0) && (args.ldb % 8 == 0) && is_aligned16(A.data_ptr()) && is_aligned16(B.data_ptr());
      auto kern = sddmm_tile_kernel<T_, I_>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kTileSmem)));
      const dim3 grid(static_cast<unsigned>(nt_bound), static_cast<unsigned>(S));
      kern<<<grid, kTlThreads, kTileSmem, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (G.scalar_type() == at::kBFloat16) {
      launch(__nv_bfloat16());
    } else {
      TORCH_CHECK(G.scalar_type() == at::kHalf, "sddmm dense_tile: bf16/fp16 only");
      launch(__half());
    }
  });
  if (S > 1) run_reduce(part, perm, out, k, S, stream);
}

void run_dense_blas(const at::Tensor& G, const at::Tensor& X, const at::Tensor& indices, const at::Tensor& plan,
                    const PlanView* pv, int64_t n_out, int64_t n_in, at::Tensor& out, cudaStream_t stream) {
  const int64_t k = indices.numel();
  at::Tensor A, B;
  bool ur, uc;
  std::tie(A, B, ur, uc) = dense_operands(G, X, plan, pv, n_out, n_in);
  const int64_t rows = A.size(1), cols = B.size(1);
  // row bands of <= kBandBytes fp32, or column bands when cols > rows (sddmm_plan.bands: keep in sync)
  const bool by_cols = cols > rows;
  const int64_t along = by_cols ? cols : rows, across = by_cols ? rows : cols;
  int64_t R = std::max<int64_t>(kTile, (kBandBytes / std::max<int64_t>(4 * across, 1)) / kTile * kTile);
  R = std::min<int64_t>(R, std::max<int64_t>(along, 1));
  const int* rowmap = pv ? pv->at(pv->L.rowmap) : nullptr;
  const int* colmap = pv ? pv->at(pv->L.colmap) : nullptr;
  for (int64_t b0 = 0; b0 < along; b0 += R) {
    const int64_t bb = std::min(R, along - b0);
    const int64_t r0 = by_cols ? 0 : b0, rr = by_cols ? rows : bb;
    const int64_t c0 = by_cols ? b0 : 0, cc = by_cols ? bb : cols;
    const at::Tensor a = A.narrow(1, r0, rr).t();
    const at::Tensor b = B.narrow(1, c0, cc);
    at::Tensor band = G.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
    band = band.contiguous();
    SPIEL_DISPATCH_INDEX(indices.scalar_type(), I_, "sddmm indices", [&] {
      const int threads = 256;
      sddmm_band_gather_kernel<I_><<<static_cast<unsigned>(ceil_div(k, threads)), threads, 0, stream>>>(
          band.data_ptr<float>(), indices.data_ptr<I_>(), rowmap, colmap, ur, uc, out.data_ptr<float>(), k, n_in,
          r0, rr, c0, cc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

at::Tensor sddmm_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                      int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& plan) {
  TORCH_CHECK(grad_output.is_cuda() && input.is_cuda() && indices.is_cuda(), "sddmm: CUDA tensors expected");
  TORCH_CHECK(grad_output.dim() == 2 && input.dim() == 2, "sddmm: grad_output and input must be 2-D");
  TORCH_CHECK(grad_output.size(0) == input.size(0), "sddmm: grad_output and input must have the same tokens");
  TORCH_CHECK(grad_output.size(1) == out_features && input.size(1) == in_features, "sddmm: feature sizes");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "sddmm: grad_output and input dtypes differ");
  TORCH_CHECK(grad_output.is_contiguous() && input.is_contiguous() && indices.is_contiguous(),
              "sddmm: contiguous tensors expected");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t k = indices.numel();
  const int64_t T = grad_output.size(0);
  at::Tensor out = at::empty({k}, grad_output.options().dtype(at::kFloat));
  if (k == 0) return out;
  if (T == 0) return out.zero_();

  if (!plan.has_value()) {  // no plan: the vendor GEMM over row bands (correct, never slower than dense)
    run_dense_blas(grad_output, input, indices, at::Tensor(), nullptr, out_features, in_features, out, stream);
    return out;
  }
  const at::Tensor& p = *plan;
  TORCH_CHECK(p.is_cuda() && p.dim() == 1 && p.scalar_type() == at::kInt && p.is_contiguous(),
              "sddmm: plan must be the contiguous 1-D int32 CUDA tensor made by sddmm_plan");
  if (p.numel() == kHdr + out_features + 1) {  // a row plan (sddmm_plan.build_row_plan): sorted indices
    TORCH_CHECK(k < (int64_t(1) << 31), "sddmm: a row plan holds int32 list positions: k must be < 2^31");
    if (wgmma_applies(grad_output, input)) {
      run_dense_tile_wgmma(grad_output, input, indices, nullptr, p.data_ptr<int>() + kHdr, false, false,
                           out_features, in_features, out, stream);
    } else {
      run_dense_blas(grad_output, input, indices, at::Tensor(), nullptr, out_features, in_features, out, stream);
    }
    return out;
  }
  PlanView pv;
  pv.L = make_layout(k, out_features, in_features);
  int64_t code = p.numel() - pv.L.base;
  TORCH_CHECK(code >= 0 && code < int64_t(kNLevels) * kNLevels * kNStrategies * kNStrategies,
              "sddmm: the plan was not built for these indices / shape");
  pv.base = p.data_ptr<int>();
  pv.strategy = static_cast<int>(code % kNStrategies);  // cuda strategy is the last digit
  code /= kNStrategies * kNStrategies;
  pv.level_r = static_cast<int>(code / kNLevels);
  pv.level_c = static_cast<int>(code % kNLevels);
  int strategy = pv.strategy;
  if (grad_output.scalar_type() == at::kFloat) strategy = kSparse;  // exact fp32 products
  switch (strategy) {
    case kSparse:
      run_sparse(grad_output, input, indices, pv, out_features, in_features, out, stream);
      break;
    case kDenseTile:
      run_dense_tile(grad_output, input, indices, p, pv, out_features, in_features, out, stream);
      break;
    default:
      run_dense_blas(grad_output, input, indices, p, &pv, out_features, in_features, out, stream);
  }
  return out;
}

}  // namespace spiel
