// The cell-list KNN of knn_cells.h on CUDA.  No torch headers: the host code
// (knn_cuda.cpp) allocates, computes the two bounding boxes and the prefix sums
// with torch ops on the same stream, and calls the launchers below.  Nothing
// here synchronises with the host.
//
//   build:  geometry (one thread per batch element)
//           lists (one warp per cell), pass "count": U_C by a warp-wide K-th
//           smallest of maxdist^2 over all points, the admission bound, and how
//           many points of each distance band pass mindist^2 <= bound; pass
//           "fill": the entries (x, y, z, index bits: one 16-byte load each in the
//           search) written at the cell's offset band after band.  The offsets
//           are an exclusive prefix sum of the counts over the whole batch; a list
//           that does not fit in the budget is marked as overflowing (offset -1).
//           GPAVATAR_KNN_CUDA_BUILD=two_level (the default): one block per parent cell (2 x 2 x 2
//           cells) puts the parent's list in shared memory and each warp builds
//           one child's list from it (the same lists; knn_cells.h).
//           GPAVATAR_KNN_CUDA_BUILD=one_pass: the two-level build in one launch: a
//           warp that has counted its list reserves room for it with one atomicAdd
//           on a counter (offset[B * G^3]) and fills it at once, instead of a second
//           launch that builds the parents' lists and scans them again; compiled for
//           4 blocks an SM (one wave of parents at G = 16).  The lists are the same,
//           only their places in the storage depend on the order in which the warps
//           reserve (so, where the budget runs out, which lists overflow); the
//           search's results do not.
//   search: the queries' cells (outside the grid or overflowing: the brute-force
//           bucket), bucketed by cell (centre order: and by distance from the
//           cell's centre) with a counting sort, then one thread per
//           query in bucket order: the threads of a warp share a cell and read
//           the same entries (broadcast loads from L1); each stops at the first
//           band that cannot improve its K neighbours (knn_cells.h).
//           GPAVATAR_KNN_CUDA_SEARCH=unrolled loads the next entry before offering
//           the current one (the plain loop waits on every load: one LDG.128 and
//           its use per entry in the sm_90 code); =grouped (scan_grouped) compares
//           four entries' distances with the K-th before offering any of them
//           (sm_90: ~50 instructions for four refused entries, against ~35 an
//           entry in the banded loop, a third of them register moves).
#include <cuda_runtime.h>

#include "knn/knn.h"
#include "knn/knn_cells.h"

namespace gpavatar {
namespace knn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

__global__ void geometry_kernel(const float* __restrict__ bounds,  // [B, 12]
                                float* __restrict__ geom,          // [B, kCellGeomStride]
                                int64_t B, int G, int order) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const float* r = bounds + 12 * b;
  float* g = geom + kCellGeomStride * b;
  cell_grid_geometry(r, r + 3, r + 6, r + 9, G, g);
  for (int i = 12; i < kCellGeomStride; ++i) g[i] = i == kGeomOrder ? static_cast<float>(order) : 0.0f;
}

// The K-th smallest of the values the 32 lanes hold in their sorted lists (each
// lane: `own` ascending values with their point indices `own_i`, `n` of them);
// lane r (r < K) also gets the index of the r-th smallest value: the K points that
// define U_C, the seeds of the buffered search.
template <int Capacity>
__device__ float warp_k_smallest(const float (&own)[Capacity], const int (&own_i)[Capacity], int n,
                                 int K, int& seed) {
  const int lane = threadIdx.x & 31;
  int head = 0;
  float kth = __int_as_float(0x7f800000);
  seed = -1;
  for (int r = 0; r < K; ++r) {
    float v = head < n ? own[head] : __int_as_float(0x7f800000);
    int who = lane;
    int i = head < n ? own_i[head] : -1;
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFull, v, off);
      const int ow = __shfl_xor_sync(kFull, who, off);
      const int oi = __shfl_xor_sync(kFull, i, off);
      if (ov < v || (ov == v && ow < who)) {
        v = ov;
        who = ow;
        i = oi;
      }
    }
    kth = v;
    if (who == lane) ++head;
    if (lane == r) seed = i;
  }
  return kth;
}

// Where a cell's candidates come from: every point of the batch element (index =
// position), or its parent's list in shared memory (index order; two-level build).
struct PointSource {
  const float* pts;
  int64_t n;
  __device__ void load(int64_t s, float& x, float& y, float& z, int& index) const {
    x = pts[3 * s];
    y = pts[3 * s + 1];
    z = pts[3 * s + 2];
    index = static_cast<int>(s);
  }
};

struct EntrySource {
  const float4* entries;
  int64_t n;
  __device__ void load(int64_t s, float& x, float& y, float& z, int& index) const {
    const float4 e = entries[s];
    x = e.x;
    y = e.y;
    z = e.z;
    index = __float_as_int(e.w);
  }
};

// Lane-local K smallest (value, index) pairs, ascending (n of them).
template <int Capacity>
__device__ void keep_k_smallest(float (&own)[Capacity], int (&own_i)[Capacity], int& n, int K, float d, int p) {
  if (n < K || d < own[n - 1]) {
    int j = n < K ? n++ : K - 1;
    while (j > 0 && own[j - 1] > d) {
      own[j] = own[j - 1];
      own_i[j] = own_i[j - 1];
      --j;
    }
    own[j] = d;
    own_i[j] = p;
  }
}

// Match compaction (GPAVATAR_KNN_CUDA_COMPACT=match): the place of this lane's entry in
// its band (band < 0: none) among the entries the warp's earlier steps and lower lanes
// put there.  `run` (this warp's kCellBands counters in shared memory) holds each band's
// next place and moves past this step's entries.  One match instruction a step instead of
// a ballot per band (the ballot loops were ~150 (count) and ~330 (fill) instructions a
// step at sm_90; the same places: source order within a band).
__device__ int band_place(int* run, int band) {
  const int lane = threadIdx.x & 31;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  const unsigned same = __match_any_sync(kFull, band);
#else  // no match instruction before sm_70: the lanes of each band by a ballot per band
  unsigned same = 0;
  for (int j = -1; j < kCellBands; ++j) {
    const unsigned m = __ballot_sync(kFull, band == j);
    if (band == j) same = m;
  }
#endif
  const int rank = __popc(same & ((1u << lane) - 1u));
  const int place = band >= 0 ? run[band] + rank : -1;
  __syncwarp();
  if (band >= 0 && rank == 0) run[band] += __popc(same);
  __syncwarp();
  return place;
}

// Lanes j < kCellBands: run[j] = the sum of counts[0 .. j - 1] (the bands' starts), then the
// warp synchronises.
__device__ void band_starts(int* run, const int* counts) {
  const int lane = threadIdx.x & 31;
  int start = 0;
  if (lane < kCellBands)
    for (int j = 0; j < lane; ++j) start += counts[j];
  __syncwarp();
  if (lane < kCellBands) run[lane] = start;
  __syncwarp();
}

constexpr int kMaxListWarps = 8;  // warps a block of any list kernel (kParentChunks, kWarpsPerBlock)

// One warp builds the list of (cell, batch element) `slot` from `src`:
// kListCount: U_C by a warp-wide K-th smallest, bound[cell], count[cell] = |L_C|
//   and the entries per band;
// kListFill: the list at offset[cell], band after band (source order, which is
//   index order, within a band), when it fits in `budget` entries;
// kListBoth: kListCount, then room for the list reserved on the counter offset[B * G^3]
//   (offset[cell] = its start, or -1 when it does not fit), then kListFill.
// Match: band_place instead of the ballot per band (the same lists).
template <int Capacity, int Order, bool Match, typename Source>
__device__ void cell_list_warp(const Source& src, const float* __restrict__ pts, const float* __restrict__ g,
                               int G, int cell, int64_t slot, int* __restrict__ count,
                               float* __restrict__ cell_bound, int* __restrict__ band_count,
                               float* __restrict__ seeds, int64_t* __restrict__ offset, int64_t counter,
                               float* __restrict__ cand, int64_t budget, int K, int pass) {
  const int lane = threadIdx.x & 31;
  float lo[3], hi[3];
  cell_box(g, G, cell, lo, hi);
  float bound;
  // Where each band's next entry goes: run[] in registers (absolute places), or with Match this
  // warp's counters in shared memory (places from the list's start, list_start).
  int64_t run[kCellBands];
  __shared__ int match_run[kMaxListWarps][kCellBands];
  int* const mrun = match_run[threadIdx.x >> 5];
  int64_t list_start = 0;
  if (pass != kListFill) {
    // U_C: lane-local K smallest maxdist^2 (ascending), then the warp-wide K-th.
    float own[Capacity];
    int own_i[Capacity];
    int n = 0;
    for (int64_t s = lane; s < src.n; s += 32) {
      float x, y, z;
      int p;
      src.load(s, x, y, z, p);
      keep_k_smallest<Capacity>(own, own_i, n, K, box_max_dist2(lo, hi, x, y, z), p);
    }
    int seed;
    bound = candidate_bound(warp_k_smallest<Capacity>(own, own_i, n, K, seed));
    if (lane < K) {
      const int64_t sp = seed < 0 ? 0 : seed;
      reinterpret_cast<float4*>(seeds)[slot * K + lane] =
          make_float4(pts[3 * sp], pts[3 * sp + 1], pts[3 * sp + 2], __int_as_float(static_cast<int>(sp)));
    }
    if constexpr (Match) {
      if (lane < kCellBands) mrun[lane] = 0;
      __syncwarp();
    } else {
#pragma unroll
      for (int j = 0; j < kCellBands; ++j) run[j] = 0;
    }
  } else {
    const int64_t start = offset[slot];
    if (offset[slot + 1] > budget) return;  // overflow: its queries take the brute-force scan
    bound = cell_bound[slot];
    const int* bc = band_count + slot * kCellBands;
    if constexpr (Match) {
      list_start = start;
      band_starts(mrun, bc);
    } else {
      int64_t at = start;
#pragma unroll
      for (int j = 0; j < kCellBands; ++j) {
        run[j] = at;
        at += bc[j];
      }
    }
  }
  // The entries band j holds so far (after a count: the band's size).
  auto band_total = [&](int j) -> int64_t {
    if constexpr (Match) {
      return mrun[j];
    } else {
      return run[j];
    }
  };
  // (Order: geom[kGeomOrder], which the geometry kernel wrote from the same setting; the box
  // order never reads the frame.)
  const CentreBands frame = Order == kOrderCentre ? centre_bands(lo, hi, bound) : CentreBands{};
  if (pass == kListBoth) {
    // Count the list (one pass over the source), reserve its room, then fill it below.
    for (int64_t base = 0; base < src.n; base += 32) {
      const int64_t s = base + lane;
      float x = 0.0f, y = 0.0f, z = 0.0f, key = 0.0f;
      if (s < src.n) {
        int p;
        src.load(s, x, y, z, p);
        key = box_min_dist2(lo, hi, x, y, z);
      }
      const int band = s < src.n && key <= bound ? list_band(Order, frame, key, bound, x, y, z) : -1;
      if constexpr (Match) {
        band_place(mrun, band);
      } else {
#pragma unroll
        for (int j = 0; j < kCellBands; ++j) run[j] += __popc(__ballot_sync(kFull, band == j));
      }
    }
    int64_t total = 0;
#pragma unroll
    for (int j = 0; j < kCellBands; ++j) total += band_total(j);
    unsigned long long start = 0;
    if (lane == 0) {
      start = atomicAdd(reinterpret_cast<unsigned long long*>(offset + counter),
                        static_cast<unsigned long long>(total));
      const bool fits = static_cast<int64_t>(start) + total <= budget;
      offset[slot] = fits ? static_cast<int64_t>(start) : -1;
      cell_bound[slot] = bound;
#pragma unroll
      for (int j = 0; j < kCellBands; ++j) band_count[slot * kCellBands + j] = static_cast<int>(band_total(j));
    }
    start = __shfl_sync(kFull, start, 0);
    if (static_cast<int64_t>(start) + total > budget) return;  // overflow: brute force (the whole warp)
    if constexpr (Match) {
      list_start = static_cast<int64_t>(start);
      band_starts(mrun, mrun);  // (each lane reads the counts before any writes a start)
    } else {
      int64_t at = static_cast<int64_t>(start);
#pragma unroll
      for (int j = 0; j < kCellBands; ++j) {
        const int64_t n = run[j];
        run[j] = at;
        at += n;
      }
    }
  }
  const bool fill = pass != kListCount;
  for (int64_t base = 0; base < src.n; base += 32) {
    const int64_t s = base + lane;
    float x = 0.0f, y = 0.0f, z = 0.0f, key = 0.0f;
    int p = 0;
    if (s < src.n) {
      src.load(s, x, y, z, p);
      key = box_min_dist2(lo, hi, x, y, z);
    }
    const bool keep = s < src.n && key <= bound;
    const int band = keep ? list_band(Order, frame, key, bound, x, y, z) : -1;
    if constexpr (Match) {
      const int place = band_place(mrun, band);
      if (fill && band >= 0)
        reinterpret_cast<float4*>(cand + 4 * (list_start + place))[0] = make_float4(x, y, z, __int_as_float(p));
    } else {
#pragma unroll
      for (int j = 0; j < kCellBands; ++j) {
        const unsigned mask = __ballot_sync(kFull, band == j);
        if (fill && band == j) {
          float* e = cand + 4 * (run[j] + __popc(mask & ((1u << lane) - 1u)));
          reinterpret_cast<float4*>(e)[0] = make_float4(x, y, z, __int_as_float(p));
        }
        run[j] += __popc(mask);
      }
    }
  }
  if (pass == kListCount && lane == 0) {
    int64_t total = 0;
#pragma unroll
    for (int j = 0; j < kCellBands; ++j) {
      band_count[slot * kCellBands + j] = static_cast<int>(band_total(j));
      total += band_total(j);
    }
    count[slot] = static_cast<int>(total < 0x7fffffff ? total : 0x7fffffff);
    cell_bound[slot] = bound;
  }
}

// One warp per (cell, batch element), every point a candidate.
template <int Capacity, int Order, bool Match>
__global__ void lists_kernel(const float* __restrict__ points,  // [B, P, 3]
                             const float* __restrict__ geom,    // [B, kCellGeomStride]
                             int* __restrict__ count,           // [B, G^3]
                             float* __restrict__ cell_bound,    // [B, G^3]
                             int* __restrict__ band_count,      // [B, G^3, kCellBands]
                             float* __restrict__ seeds,         // [B, G^3, K, 4]
                             int64_t* __restrict__ offset,      // [B * G^3 + 1] (fill)
                             float* __restrict__ cand,          // [budget, 4] (fill)
                             int64_t budget, int64_t P, int G, int K, int pass) {
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const int64_t b = blockIdx.y;
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (cell >= cells) return;  // whole warps leave together
  const float* pts = points + b * P * 3;
  cell_list_warp<Capacity, Order, Match>(PointSource{pts, P}, pts, geom + kCellGeomStride * b, G, static_cast<int>(cell),
                                  b * cells + cell, count, cell_bound, band_count, seeds, offset, gridDim.y * cells,
                                  cand, budget, K, pass);
}

// Two-level build (knn_cells.h): one 256-thread block per (parent cell, batch
// element) puts the parent's list in shared memory (an ordered block-wide
// compaction: index order), then warp w builds child w's list from it (from every
// point when the parent's list is longer than parent_cap).  Both passes ("count"
// and "fill") rebuild the parent's list the same way.  MinBlocks: 0 leaves the
// registers to the compiler (80 at sm_90: 3 blocks an SM; an explicit 1 gives 94 and 2
// blocks); the one-pass build asks for 4 (64 registers, a few bytes spilled): the 512
// parents of G = 16 then fit in one wave on 132 SMs instead of 1.3
// (benchmarks/kernel_resources.py).
constexpr int kParentThreads = 32 * kParentChunks;

template <int Capacity, int Order, int MinBlocks, bool Match>
__global__ void __launch_bounds__(kParentThreads, MinBlocks)
    lists_two_level_kernel(const float* __restrict__ points, const float* __restrict__ geom,
                           int* __restrict__ count, float* __restrict__ cell_bound,
                           int* __restrict__ band_count, float* __restrict__ seeds,
                           int64_t* __restrict__ offset, float* __restrict__ cand, int64_t budget,
                           int64_t P, int G, int K, int pass, int parent_cap) {
  __shared__ float4 parent[kParentCap];
  __shared__ float chunk_kth[kParentChunks];
  __shared__ int chunk_kept[kParentChunks];
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const int64_t b = blockIdx.y;
  const int pc = static_cast<int>(blockIdx.x);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* g = geom + kCellGeomStride * b;
  const float* pts = points + b * P * 3;
  float lo[3], hi[3];
  parent_box(g, G, pc, lo, hi);
  // U': the smallest of the chunks' K-th smallest maxdist^2 (chunk = this warp's points).
  {
    float own[Capacity];
    int own_i[Capacity];
    int n = 0;
    for (int64_t p = threadIdx.x; p < P; p += kParentThreads)
      keep_k_smallest<Capacity>(own, own_i, n, K, box_max_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]),
                                static_cast<int>(p));
    int unused;
    const float kth = warp_k_smallest<Capacity>(own, own_i, n, K, unused);
    if (lane == 0) chunk_kth[warp] = kth;
  }
  __syncthreads();
  float u = chunk_kth[0];
  for (int w = 1; w < kParentChunks; ++w) u = chunk_kth[w] < u ? chunk_kth[w] : u;
  const float bound = candidate_bound(u);
  // The parent's list, in index order.
  int64_t total = 0;
  for (int64_t base = 0; base < P; base += kParentThreads) {
    const int64_t p = base + threadIdx.x;
    float x = 0.0f, y = 0.0f, z = 0.0f;
    bool keep = false;
    if (p < P) {
      x = pts[3 * p];
      y = pts[3 * p + 1];
      z = pts[3 * p + 2];
      keep = box_min_dist2(lo, hi, x, y, z) <= bound;
    }
    const unsigned mask = __ballot_sync(kFull, keep);
    if (lane == 0) chunk_kept[warp] = __popc(mask);
    __syncthreads();
    int64_t at = total + __popc(mask & ((1u << lane) - 1u));
    int64_t step = 0;
    for (int w = 0; w < kParentChunks; ++w) {
      at += w < warp ? chunk_kept[w] : 0;
      step += chunk_kept[w];
    }
    if (keep && at < parent_cap) parent[at] = make_float4(x, y, z, __int_as_float(static_cast<int>(p)));
    total += step;
    __syncthreads();  // chunk_kept is rewritten next round
  }
  const int child = parent_child(G, pc, warp);
  if (child < 0) return;  // past the grid's edge (no block-wide synchronisation below)
  const int64_t slot = b * cells + child;
  if (total <= parent_cap) {
    cell_list_warp<Capacity, Order, Match>(EntrySource{parent, total}, pts, g, G, child, slot, count, cell_bound,
                                    band_count, seeds, offset, gridDim.y * cells, cand, budget, K, pass);
  } else {
    cell_list_warp<Capacity, Order, Match>(PointSource{pts, P}, pts, g, G, child, slot, count, cell_bound, band_count,
                                    seeds, offset, gridDim.y * cells, cand, budget, K, pass);
  }
}

// The bucket of every query (cell * L + its level, or G^3 * L for brute force; L =
// query_levels(order)) and the bucket sizes.
__global__ void bucket_count_kernel(const float* __restrict__ queries,  // [B, M, 3]
                                    const float* __restrict__ geom,
                                    const int64_t* __restrict__ offset,  // [B * G^3 + 1]
                                    int* __restrict__ bucket_of,          // [B, M]
                                    int* __restrict__ bucket_count,       // [B, G^3 * L + 1]
                                    int64_t budget, int64_t B, int64_t M, int G, int order) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * M) return;
  const int64_t b = i / M;
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const int L = query_levels(order);
  const float* g = geom + kCellGeomStride * b;
  const float x = queries[3 * i], y = queries[3 * i + 1], z = queries[3 * i + 2];
  int c = query_cell(g, G, x, y, z);
  // The list overflowed, or was built in another order than the search's.
  if (c >= 0 && (offset[b * cells + c] < 0 || grid_order(g) != order)) c = -1;
  const int bucket = c < 0 ? static_cast<int>(cells) * L : c * L + (L > 1 ? query_level(g, G, c, x, y, z) : 0);
  bucket_of[i] = bucket;
  atomicAdd(bucket_count + b * (cells * L + 1) + bucket, 1);
}

__global__ void bucket_scatter_kernel(const int* __restrict__ bucket_of,
                                      const int64_t* __restrict__ bucket_start,  // [B * (G^3 * L + 1)]
                                      int* __restrict__ bucket_fill, int* __restrict__ order,
                                      int64_t B, int64_t M, int G, int L) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * M) return;
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const int64_t slot = (i / M) * (cells * L + 1) + bucket_of[i];
  order[bucket_start[slot] + atomicAdd(bucket_fill + slot, 1)] = static_cast<int>(i);
}

// One thread per query in bucket order, scanning its list with the Search mode
// (knn_cells.h's kSearch*).  kSearchBuffered: scan_buffered with each thread's
// buffer in shared memory (Cap slots, interleaved across the block's threads:
// conflict-free); kSearchUnrolled: scan_banded with the next entry loaded early;
// kSearchGrouped: scan_grouped; kSearchBanded: scan_banded.  The unrolled and grouped
// scans keep loads in flight across entries (grouped: the next group's four while the
// current one is compared): at K <= 8 they are held to 80 registers (3 blocks, 24 warps
// an SM; sm_90 grouped: 85 registers and 2 blocks without the bound, a few bytes spilled
// outside the entry loop with it).
template <int Capacity, int Search, int Cap, int Threads, int Order>
__global__ void __launch_bounds__(Threads, (Search == kSearchUnrolled || Search == kSearchGrouped) && Capacity <= 8 ? 3 : 1)
    search_kernel(const float* __restrict__ queries, const float* __restrict__ points,
                  const int* __restrict__ order, const int* __restrict__ bucket_of,
                  const float* __restrict__ geom, const int64_t* __restrict__ offset, const float* __restrict__ cand,
                  const float* __restrict__ cell_bound, const int* __restrict__ band_count,
                  const float* __restrict__ seeds, float* __restrict__ dist2, int64_t* __restrict__ idx,
                  int64_t B, int64_t M, int64_t P, int G, int K) {
  constexpr bool Buffered = Search == kSearchBuffered;
  __shared__ float buf_d[Buffered ? Cap * Threads : 1];
  __shared__ int buf_i[Buffered ? Cap * Threads : 1];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (t >= B * M) return;  // no block-wide synchronisation below
  const int64_t qi = order[t];
  const int64_t b = qi / M;
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const float qx = queries[3 * qi], qy = queries[3 * qi + 1], qz = queries[3 * qi + 2];
  constexpr int L = Order == kOrderCentre ? kCentreQueryLevels : 1;  // query_levels(Order)
  const int bucket = bucket_of[qi] / L;  // the cell (G^3: brute force)
  if (bucket == cells) {
    TopK<int, Capacity> best(K);
    scan_all(points + b * P * 3, P, qx, qy, qz, best);
    for (int j = 0; j < K; ++j) {
      dist2[qi * K + j] = best.dist[j];
      idx[qi * K + j] = best.idx[j];
    }
    return;
  }
  const int64_t slot = b * cells + bucket;
  const BandStop<Order> stop = band_stop<Order>(geom + kCellGeomStride * b, G, bucket, cell_bound[slot], qx, qy, qz);
  TopKRegs<Capacity> best(K);
  if constexpr (Buffered) {
    scan_buffered(cand + 4 * offset[slot], band_count + slot * kCellBands, stop, seeds + 4 * slot * K, qx, qy,
                  qz, buf_d + threadIdx.x, buf_i + threadIdx.x, Threads, Cap, best);
  } else if constexpr (Search == kSearchGrouped) {
    scan_grouped(cand + 4 * offset[slot], band_count + slot * kCellBands, stop, qx, qy, qz, best);
  } else {
    scan_banded<Capacity, Search == kSearchUnrolled>(cand + 4 * offset[slot], band_count + slot * kCellBands, stop,
                                                     qx, qy, qz, best);
  }
#pragma unroll
  for (int j = 0; j < Capacity; ++j) {
    if (j < K) {
      dist2[qi * K + j] = best.dist[j];
      idx[qi * K + j] = best.idx[j];
    }
  }
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <int Capacity, int Order, bool Match>
void launch_lists(const CellKnnCuda& a, int pass, cudaStream_t s) {
  const int64_t cells = static_cast<int64_t>(a.G) * a.G * a.G;
  if (a.two_level) {
    const int Gp = parent_cells(a.G);
    const dim3 grid(static_cast<unsigned>(Gp * Gp * Gp), static_cast<unsigned>(a.B));
    if (pass == kListBoth) {
      lists_two_level_kernel<Capacity, Order, 4, Match><<<grid, kParentThreads, 0, s>>>(
          a.points, a.geom, a.count, a.cell_bound, a.band_count, a.seeds, a.offset, a.cand, a.budget, a.P, a.G,
          a.K, pass, a.parent_cap);
    } else {
      lists_two_level_kernel<Capacity, Order, 0, Match><<<grid, kParentThreads, 0, s>>>(
          a.points, a.geom, a.count, a.cell_bound, a.band_count, a.seeds, a.offset, a.cand, a.budget, a.P, a.G,
          a.K, pass, a.parent_cap);
    }
    return;
  }
  const dim3 grid(static_cast<unsigned>((cells + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(a.B));
  lists_kernel<Capacity, Order, Match><<<grid, 32 * kWarpsPerBlock, 0, s>>>(
      a.points, a.geom, a.count, a.cell_bound, a.band_count, a.seeds, a.offset, a.cand, a.budget, a.P, a.G, a.K,
      pass);
}

template <int Capacity, bool Match>
void launch_lists(const CellKnnCuda& a, int pass, cudaStream_t s) {
  if (a.list_order == kOrderCentre) {
    launch_lists<Capacity, kOrderCentre, Match>(a, pass, s);
  } else {
    launch_lists<Capacity, kOrderBox, Match>(a, pass, s);
  }
}

template <int Capacity>
void launch_lists(const CellKnnCuda& a, int pass, cudaStream_t s) {
  if (a.match) {
    launch_lists<Capacity, true>(a, pass, s);
  } else {
    launch_lists<Capacity, false>(a, pass, s);
  }
}

}  // namespace

int launch_cell_lists_cuda(const CellKnnCuda& a, int pass, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.B == 0) return 0;
  if (pass != kListFill) geometry_kernel<<<blocks_for(a.B), kThreads, 0, s>>>(a.bounds, a.geom, a.B, a.G, a.list_order);
  if (a.K <= 8) {
    launch_lists<8>(a, pass, s);
  } else if (a.K <= 16) {
    launch_lists<16>(a, pass, s);
  } else {
    launch_lists<kMaxK>(a, pass, s);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_cell_bucket_cuda(const CellKnnCuda& a, bool scatter, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.B == 0 || a.M == 0) return 0;
  const unsigned blocks = blocks_for(a.B * a.M);
  if (!scatter) {
    bucket_count_kernel<<<blocks, kThreads, 0, s>>>(a.queries, a.geom, a.offset, a.query_cell,
                                                    a.bucket_count, a.budget, a.B, a.M, a.G, a.list_order);
  } else {
    bucket_scatter_kernel<<<blocks, kThreads, 0, s>>>(a.query_cell, a.bucket_start, a.bucket_fill,
                                                      a.order, a.B, a.M, a.G, query_levels(a.list_order));
  }
  return static_cast<int>(cudaGetLastError());
}

namespace {

template <int Capacity, int Search, int Cap, int Threads>
void launch_search(const CellKnnCuda& a, cudaStream_t s) {
  const int64_t n = a.B * a.M;
  const unsigned blocks = static_cast<unsigned>((n + Threads - 1) / Threads);
  if (a.list_order == kOrderCentre) {
    search_kernel<Capacity, Search, Cap, Threads, kOrderCentre><<<blocks, Threads, 0, s>>>(
        a.queries, a.points, a.order, a.query_cell, a.geom, a.offset, a.cand, a.cell_bound, a.band_count, a.seeds,
        a.dist2, a.idx, a.B, a.M, a.P, a.G, a.K);
  } else {
    search_kernel<Capacity, Search, Cap, Threads, kOrderBox><<<blocks, Threads, 0, s>>>(
        a.queries, a.points, a.order, a.query_cell, a.geom, a.offset, a.cand, a.cell_bound, a.band_count, a.seeds,
        a.dist2, a.idx, a.B, a.M, a.P, a.G, a.K);
  }
}

// The search of a.search for lists of up to Capacity neighbours (BufferedCap slots and
// BufferedThreads threads a block for the buffered scan).
template <int Capacity, int BufferedCap, int BufferedThreads>
void launch_search_mode(const CellKnnCuda& a, cudaStream_t s) {
  switch (a.search) {
    case kSearchBuffered:
      launch_search<Capacity, kSearchBuffered, BufferedCap, BufferedThreads>(a, s);
      break;
    case kSearchUnrolled:
      launch_search<Capacity, kSearchUnrolled, 1, kThreads>(a, s);
      break;
    case kSearchGrouped:
      launch_search<Capacity, kSearchGrouped, 1, kThreads>(a, s);
      break;
    default:
      launch_search<Capacity, kSearchBanded, 1, kThreads>(a, s);
  }
}

}  // namespace

int launch_cell_search_cuda(const CellKnnCuda& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.B == 0 || a.M == 0) return 0;
  // Buffered: buffer_slots(Capacity) slots per thread, 32 KiB of shared memory or less per block.
  if (a.K <= 8) {
    launch_search_mode<8, 32, 128>(a, s);
  } else if (a.K <= 16) {
    launch_search_mode<16, 48, 64>(a, s);
  } else {
    launch_search_mode<kMaxK, 64, 64>(a, s);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace knn
}  // namespace gpavatar
