// The cell-list KNN of knn_cells.h on the CPU (host only; included by
// knn_cpu.cpp).  Same lists and arithmetic as the CUDA kernels, plus two
// CPU-only shortcuts that change no result:
//
// * Hierarchical build.  A cell's list is a subset of its parent cell's list
//   (a child's U is <= its parent's, its mindist^2 >= the parent's), so level
//   g = G, G/2, ... builds each cell from its parent's list instead of all P
//   points; the coarsest level starts from every point.
// * Banded lists and a seed bound.  Each finest list is split into kBands bands
//   by the distance key = |c - p| from the cell centre c (index order kept
//   within a band, so candidates are offered out of index order and the tie
//   rule is applied explicitly: offer_unordered), and the K points nearest to c are kept as seeds.  A query x
//   first computes limit = max over the seeds of |x - seed|^2 (K points lie
//   that close, so d_K(x)^2 <= limit), admits only candidates with d <= limit,
//   and stops before band j once (lo_j - |x - c|)^2 exceeds the current bound:
//   every later candidate p has |x - p| >= |c - p| - |x - c| >= lo_j - |x - c|.
//   Both margins (1e-5 relative, 1e-36 absolute) are those of the lists.
//
// Lists are exact-size (the host knows every count).  `cap` (tests) makes a
// longer list overflow: its queries, and queries outside the grid, are returned
// to the caller for the fallback search.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "knn/knn.h"
#include "knn/knn_cells.h"

namespace gpavatar {
namespace knn {
namespace cells_cpu {

constexpr int kBlock = 32;
constexpr int kBands = 16;

// From a parent list (indices into the point arrays), the child's list for the
// box [lo, hi], in the parent's order.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
inline void refine(const float* px, const float* py, const float* pz, const int* parent, int64_t n, int K,
                   const float lo[3], const float hi[3], std::vector<int>& out) {
  float block[kBlock];
  TopK<int, kMaxK> best(K);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, n - start));
    const float worst = best.count < best.k ? __builtin_huge_valf() : best.worst;
    int any = 0;
    for (int t = 0; t < nb; ++t) {
      const int i = parent[start + t];
      block[t] = box_max_dist2(lo, hi, px[i], py[i], pz[i]);
      any |= block[t] < worst;
    }
    if (!any) continue;
    for (int t = 0; t < nb; ++t) best.offer(block[t], parent[start + t]);
  }
  const float bound = candidate_bound(best.dist[K - 1]);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, n - start));
    int any = 0;
    for (int t = 0; t < nb; ++t) {
      const int i = parent[start + t];
      block[t] = box_min_dist2(lo, hi, px[i], py[i], pz[i]);
      any |= block[t] <= bound;
    }
    if (!any) continue;
    for (int t = 0; t < nb; ++t)
      if (block[t] <= bound) out.push_back(parent[start + t]);
  }
}

// Offers the candidates with d <= limit (in list order) to best.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
inline void scan_band(const float* x, const float* y, const float* z, const int* id, int64_t len, float qx,
                      float qy, float qz, float limit, TopK<int64_t, kMaxK>& best) {
  float block[kBlock];
  for (int64_t start = 0; start < len; start += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, len - start));
    const float worst = best.count < best.k ? limit : (best.worst < limit ? best.worst : limit);
    int any = 0;
    for (int t = 0; t < nb; ++t) {
      block[t] = squared_distance(qx, qy, qz, x[start + t], y[start + t], z[start + t]);
      any |= block[t] <= worst;
    }
    if (!any) continue;
    // Bands break the index order: an equal distance with a lower index must still
    // displace the held K-th entry (offer_unordered).
    for (int t = 0; t < nb; ++t)
      if (block[t] <= limit) best.offer_unordered(block[t], id[start + t]);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPA_KNN_CELLS_AVX2 1
// The coordinates of points ids[start .. start + nb) (nb <= 8; other lanes 0); of points
// start .. start + nb when ids is null (contiguous loads: a band of a list, or every point
// at the coarsest level of the build).
__attribute__((target("avx2"))) inline void gather_xyz(const float* px, const float* py, const float* pz,
                                                     const int* ids, int64_t start, int nb, __m256& x, __m256& y,
                                                     __m256& z) {
  if (ids == nullptr && nb == 8) {
    x = _mm256_loadu_ps(px + start);
    y = _mm256_loadu_ps(py + start);
    z = _mm256_loadu_ps(pz + start);
    return;
  }
  const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (ids == nullptr) {
    x = _mm256_maskload_ps(px + start, in);
    y = _mm256_maskload_ps(py + start, in);
    z = _mm256_maskload_ps(pz + start, in);
    return;
  }
  const __m256i at = _mm256_maskload_epi32(ids + start, in);
  const __m256 zero = _mm256_setzero_ps(), m = _mm256_castsi256_ps(in);
  x = _mm256_mask_i32gather_ps(zero, px, at, m, 4);
  y = _mm256_mask_i32gather_ps(zero, py, at, m, 4);
  z = _mm256_mask_i32gather_ps(zero, pz, at, m, 4);
}

// (dx*dx + dy*dy) + dz*dz, rounded after every operation (sum_of_products3).
__attribute__((target("avx2"))) inline __m256 sum_squares(__m256 dx, __m256 dy, __m256 dz) {
  return _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(dx, dx), _mm256_mul_ps(dy, dy)), _mm256_mul_ps(dz, dz));
}

// scan_band with 8-wide distances (the same arithmetic: differences, then
// (dx*dx + dy*dy) + dz*dz rounded after every operation, no FMA) and a compare
// mask, so only the lanes at or below the current bound reach the list (the
// scalar loop walks the whole block once any lane passes).
// Best: TopK<int64_t, kMaxK> or Best8 (below).
template <typename Best>
__attribute__((target("avx2"))) inline void scan_band_avx2(const float* x, const float* y, const float* z,
                                                         const int* id, int64_t len, float qx, float qy,
                                                         float qz, float limit, Best& best) {
  const __m256 vx = _mm256_set1_ps(qx), vy = _mm256_set1_ps(qy), vz = _mm256_set1_ps(qz);
  alignas(32) float d[8];
  for (int64_t start = 0; start < len; start += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, len - start));
    __m256 px, py, pz;
    gather_xyz(x, y, z, nullptr, start, nb, px, py, pz);
    const __m256 d2 = sum_squares(_mm256_sub_ps(vx, px), _mm256_sub_ps(vy, py), _mm256_sub_ps(vz, pz));
    const float worst = best.count < best.k ? limit : (best.worst < limit ? best.worst : limit);
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d2, _mm256_set1_ps(worst), _CMP_LE_OQ)));
    mask &= (1u << nb) - 1u;
    if (mask == 0) continue;
    _mm256_store_ps(d, d2);
    while (mask) {
      const int t = __builtin_ctz(mask);
      mask &= mask - 1;
      // Bands break the index order: an equal distance with a lower index must still
      // displace the held K-th entry (offer_unordered).
      if (d[t] <= limit) best.offer_unordered(d[t], id[start + t]);
    }
  }
}

// refine() with 8 parent entries per vector (parent == nullptr: every point; box distances
// with max_ps, which is max_f's a > b ? a : b, NaN included) and compare masks: the same
// K-th bound and the same child list, in the parent's order.
__attribute__((target("avx2"))) inline void refine_avx2(const float* px, const float* py, const float* pz,
                                                      const int* parent, int64_t n, int K, const float lo[3],
                                                      const float hi[3], std::vector<int>& out) {
  const __m256 lo0 = _mm256_set1_ps(lo[0]), lo1 = _mm256_set1_ps(lo[1]), lo2 = _mm256_set1_ps(lo[2]);
  const __m256 hi0 = _mm256_set1_ps(hi[0]), hi1 = _mm256_set1_ps(hi[1]), hi2 = _mm256_set1_ps(hi[2]);
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float d[8];
  TopK<int, kMaxK> best(K);
  for (int64_t start = 0; start < n; start += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, n - start));
    __m256 x, y, z;
    gather_xyz(px, py, pz, parent, start, nb, x, y, z);
    const __m256 d2 = sum_squares(_mm256_max_ps(_mm256_sub_ps(x, lo0), _mm256_sub_ps(hi0, x)),
                           _mm256_max_ps(_mm256_sub_ps(y, lo1), _mm256_sub_ps(hi1, y)),
                           _mm256_max_ps(_mm256_sub_ps(z, lo2), _mm256_sub_ps(hi2, z)));
    const float worst = best.count < best.k ? __builtin_huge_valf() : best.worst;
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d2, _mm256_set1_ps(worst), _CMP_LT_OQ)));
    mask &= (1u << nb) - 1u;
    if (mask == 0) continue;
    _mm256_store_ps(d, d2);
    while (mask) {
      const int t = __builtin_ctz(mask);
      mask &= mask - 1;
      best.offer(d[t], parent == nullptr ? static_cast<int>(start + t) : parent[start + t]);
    }
  }
  const __m256 bound = _mm256_set1_ps(candidate_bound(best.dist[K - 1]));
  for (int64_t start = 0; start < n; start += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, n - start));
    __m256 x, y, z;
    gather_xyz(px, py, pz, parent, start, nb, x, y, z);
    const __m256 d2 = sum_squares(_mm256_max_ps(_mm256_max_ps(_mm256_sub_ps(lo0, x), _mm256_sub_ps(x, hi0)), zero),
                           _mm256_max_ps(_mm256_max_ps(_mm256_sub_ps(lo1, y), _mm256_sub_ps(y, hi1)), zero),
                           _mm256_max_ps(_mm256_max_ps(_mm256_sub_ps(lo2, z), _mm256_sub_ps(z, hi2)), zero));
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(d2, bound, _CMP_LE_OQ)));
    mask &= (1u << nb) - 1u;
    while (mask) {
      const int t = __builtin_ctz(mask);
      mask &= mask - 1;
      out.push_back(parent == nullptr ? static_cast<int>(start + t) : parent[start + t]);
    }
  }
}

// The K <= 8 best (distance, index) pairs of a query in two vectors, sorted
// lexicographically (ties: lower index first), empty lanes (+inf, INT_MAX): an
// insertion is a compare, a lane shift and two blends, with no data-dependent
// branch (TopK's insertion loop mispredicts about once per insertion).  Lanes past
// k - 1 hold displaced entries and are never read.  Holds TopK's K pairs for
// NaN-free distances (the cell lists never produce NaN: a NaN query is outside the
// grid, a NaN point in no list).
struct Best8 {
  __m256 dist;
  __m256i idx;
  int k;
  int count;      // = k: the empty lanes' +inf admits anything, as TopK's count < k does
  float worst;    // dist[k - 1]
  int worst_idx;  // idx[k - 1]
  void offer_unordered(float d, int64_t i);
};

__attribute__((target("avx2"))) inline void best8_init(Best8& b, int k) {
  b.dist = _mm256_set1_ps(__builtin_huge_valf());
  b.idx = _mm256_set1_epi32(0x7fffffff);
  b.k = b.count = k;
  b.worst = __builtin_huge_valf();
  b.worst_idx = 0x7fffffff;
}

__attribute__((target("avx2"))) inline void best8_offer(Best8& b, float d, int i) {
  if (!(d < b.worst || (d == b.worst && i < b.worst_idx))) return;
  const __m256 dv = _mm256_set1_ps(d);
  const __m256i iv = _mm256_set1_epi32(i);
  // Lanes the new pair goes before: a suffix of the sorted lanes.
  const __m256 after = _mm256_or_ps(
      _mm256_cmp_ps(b.dist, dv, _CMP_GT_OQ),
      _mm256_and_ps(_mm256_cmp_ps(b.dist, dv, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(b.idx, iv))));
  const __m256i right = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
  const __m256 shifted_d = _mm256_permutevar8x32_ps(b.dist, right);
  const __m256i shifted_i = _mm256_permutevar8x32_epi32(b.idx, right);
  // Lane j takes lane j - 1 where lane j - 1 also moves, the new pair at the first moving lane.
  const __m256 prev = _mm256_blend_ps(_mm256_permutevar8x32_ps(after, right), _mm256_setzero_ps(), 1);
  const __m256 moved_d = _mm256_blendv_ps(dv, shifted_d, prev);
  const __m256i moved_i = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(iv), _mm256_castsi256_ps(shifted_i), prev));
  b.dist = _mm256_blendv_ps(b.dist, moved_d, after);
  b.idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b.idx), _mm256_castsi256_ps(moved_i), after));
  const __m256i last = _mm256_set1_epi32(b.k - 1);
  b.worst = _mm256_cvtss_f32(_mm256_permutevar8x32_ps(b.dist, last));
  b.worst_idx = _mm256_cvtsi256_si32(_mm256_permutevar8x32_epi32(b.idx, last));
}

__attribute__((target("avx2"))) inline void Best8::offer_unordered(float d, int64_t i) {
  best8_offer(*this, d, static_cast<int>(i));
}

__attribute__((target("avx2"))) inline void best8_store(const Best8& b, TopK<int64_t, kMaxK>& best) {
  alignas(32) float d[8];
  alignas(32) int i[8];
  _mm256_store_ps(d, b.dist);
  _mm256_store_si256(reinterpret_cast<__m256i*>(i), b.idx);
  for (int j = 0; j < b.k; ++j) {
    best.dist[j] = d[j];
    best.idx[j] = i[j];
  }
  best.count = b.k;
  best.worst = d[b.k - 1];
}

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

// Lists of one batch element.
struct Lists {
  float geom[kCellGeomStride];
  int G = 0;
  std::vector<int64_t> band_start;  // [cells * (kBands + 1)]
  std::vector<float> band_lo;       // [cells * kBands] lower bound of |c - p| in the band
  std::vector<float> centre;        // [cells * 3]
  std::vector<float> seeds;         // [cells * K * 3]
  std::vector<float> x, y, z;       // candidates, cell after cell, band after band
  std::vector<int> index;
  std::vector<char> overflow;       // [cells]
};

// The grid geometry (kCellGeomStride floats) of the points (P each) and the queries (M, 3).
inline void grid_geometry(float* geom, const float* px, const float* py, const float* pz, int64_t P,
                          const float* queries, int64_t M, int G) {
  float plo[3], phi[3], qlo[3], qhi[3];
  const float* axes[3] = {px, py, pz};
  for (int a = 0; a < 3; ++a) {
    plo[a] = *std::min_element(axes[a], axes[a] + P);
    phi[a] = *std::max_element(axes[a], axes[a] + P);
    qlo[a] = __builtin_huge_valf();
    qhi[a] = -__builtin_huge_valf();
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int a = 0; a < 3; ++a) {
      const float v = queries[3 * m + a];
      qlo[a] = v < qlo[a] ? v : qlo[a];  // NaN queries change nothing
      qhi[a] = v > qhi[a] ? v : qhi[a];
    }
  }
  cell_grid_geometry(plo, phi, qlo, qhi, G, geom);
}

// px, py, pz: the points (P each); geom: the grid's geometry (grid_geometry of the points and the
// queries: the queries only set the grid's box).
inline void build(Lists& L, const float* px, const float* py, const float* pz, int64_t P,
                  const float* geom, int K, int G, int64_t cap, bool avx2 = false) {
  std::copy(geom, geom + kCellGeomStride, L.geom);
  L.G = G;

  // Levels coarse to fine: G, G/2, ... while even and > 4; the coarsest from all points.
  std::vector<int> levels;
  for (int g = G;; g /= 2) {
    levels.insert(levels.begin(), g);
    if (g % 2 || g <= 4) break;
  }
  std::vector<std::vector<int>> lists(1, std::vector<int>(P));
  for (int64_t i = 0; i < P; ++i) lists[0][i] = static_cast<int>(i);
  int prev = 1;
  for (const int g : levels) {
    const int64_t cells = static_cast<int64_t>(g) * g * g;
    std::vector<std::vector<int>> next(cells);
    const int f = G / g, r = g / prev;
    at::parallel_for(0, cells, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int ci = static_cast<int>(c % g), cj = static_cast<int>((c / g) % g), ck = static_cast<int>(c / (g * g));
        const int parent = prev == 1 ? 0 : ((ck / r) * prev + cj / r) * prev + ci / r;
        // The union of the fine cells this cell covers.
        float lo[3], hi[3], lo2[3], hi2[3];
        cell_box(L.geom, G, ((ck * f) * G + cj * f) * G + ci * f, lo, hi);
        cell_box(L.geom, G, (((ck + 1) * f - 1) * G + (cj + 1) * f - 1) * G + (ci + 1) * f - 1, lo2, hi2);
        const float box_hi[3] = {hi2[0], hi2[1], hi2[2]};
        const std::vector<int>& from = lists[parent];
#if defined(GPA_KNN_CELLS_AVX2)
        if (avx2) {
          refine_avx2(px, py, pz, prev == 1 ? nullptr : from.data(), static_cast<int64_t>(from.size()), K, lo,
                      box_hi, next[c]);
          continue;
        }
#endif
        refine(px, py, pz, from.data(), static_cast<int64_t>(from.size()), K, lo, box_hi, next[c]);
      }
    });
    lists.swap(next);
    prev = g;
  }

  const int64_t cells = static_cast<int64_t>(G) * G * G;
  std::vector<int64_t> offset(cells + 1, 0);
  L.overflow.assign(cells, 0);
  for (int64_t c = 0; c < cells; ++c) {
    const int64_t n = static_cast<int64_t>(lists[c].size());
    L.overflow[c] = n > cap;
    offset[c + 1] = offset[c] + (n > cap ? 0 : n);
  }
  const int64_t total = offset[cells];
  L.x.resize(total);
  L.y.resize(total);
  L.z.resize(total);
  L.index.resize(total);
  L.band_start.resize(cells * (kBands + 1));
  L.band_lo.resize(cells * kBands);
  L.centre.resize(cells * 3);
  L.seeds.resize(cells * K * 3);
  at::parallel_for(0, cells, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> key;
    std::vector<int> band;
    for (int64_t c = begin; c < end; ++c) {
      float lo[3], hi[3];
      cell_box(L.geom, G, static_cast<int>(c), lo, hi);
      float* centre = L.centre.data() + 3 * c;
      for (int a = 0; a < 3; ++a) centre[a] = 0.5f * (lo[a] + hi[a]);
      const std::vector<int>& list = lists[c];
      const int64_t n = L.overflow[c] ? 0 : static_cast<int64_t>(list.size());
      key.resize(n);
      band.resize(n);
      float kmin = __builtin_huge_valf(), kmax = 0.0f;
      TopK<int, kMaxK> nearest(K);
      for (int64_t t = 0; t < n; ++t) {
        const int i = list[t];
        const float d2 = squared_distance(centre[0], centre[1], centre[2], px[i], py[i], pz[i]);
        nearest.offer(d2, i);
        key[t] = std::sqrt(d2);
        kmin = key[t] < kmin ? key[t] : kmin;
        kmax = key[t] > kmax ? key[t] : kmax;
      }
      if (n == 0) kmin = 0.0f;
      // Seeds: the K points nearest to the centre (a list holds at least K points).
      float* seeds = L.seeds.data() + c * K * 3;
      for (int j = 0; j < K; ++j) {
        const int i = j < nearest.count ? nearest.idx[j] : 0;
        seeds[3 * j] = px[i];
        seeds[3 * j + 1] = py[i];
        seeds[3 * j + 2] = pz[i];
      }
      const float width = (kmax - kmin) / kBands;
      int64_t counts[kBands] = {0};
      for (int64_t t = 0; t < n; ++t) {
        int j = width > 0.0f ? static_cast<int>((key[t] - kmin) / width) : 0;
        j = j < 0 ? 0 : (j >= kBands ? kBands - 1 : j);
        band[t] = j;
        ++counts[j];
      }
      int64_t* starts = L.band_start.data() + c * (kBands + 1);
      float* lows = L.band_lo.data() + c * kBands;
      starts[0] = offset[c];
      for (int j = 0; j < kBands; ++j) {
        starts[j + 1] = starts[j] + counts[j];
        // Keys are float square roots (relative error < 1e-6): a 1e-5 lower margin.
        lows[j] = (kmin + static_cast<float>(j) * width) * (1.0f - 1e-5f);
      }
      int64_t cursor[kBands];
      for (int j = 0; j < kBands; ++j) cursor[j] = starts[j];
      for (int64_t t = 0; t < n; ++t) {
        const int64_t at = cursor[band[t]]++;
        const int i = list[t];
        L.x[at] = px[i];
        L.y[at] = py[i];
        L.z[at] = pz[i];
        L.index[at] = i;
      }
    }
  });
}

// The bands of a cell's list for one query, stopping before the first band that cannot
// improve its K best (Best8 only with the AVX2 scan).
template <typename Best>
inline void scan_bands(const Lists& L, int cell, float qx, float qy, float qz, float limit, float reach, Best& best,
                       bool avx2) {
  const int64_t* starts = L.band_start.data() + static_cast<int64_t>(cell) * (kBands + 1);
  const float* lows = L.band_lo.data() + static_cast<int64_t>(cell) * kBands;
  for (int j = 0; j < kBands; ++j) {
    const float bound = best.count == best.k && best.worst < limit ? best.worst : limit;
    const float gap = lows[j] - reach;
    if (gap > 0.0f && gap * gap > candidate_bound(bound)) break;
    const int64_t at = starts[j], n = starts[j + 1] - at;
    if (n == 0) continue;
#if defined(GPA_KNN_CELLS_AVX2)
    if (avx2) {
      scan_band_avx2(L.x.data() + at, L.y.data() + at, L.z.data() + at, L.index.data() + at, n, qx, qy, qz,
                     limit, best);
      continue;
    }
#endif
    if constexpr (std::is_same_v<Best, TopK<int64_t, kMaxK>>)
      scan_band(L.x.data() + at, L.y.data() + at, L.z.data() + at, L.index.data() + at, n, qx, qy, qz, limit,
                best);
  }
}

// The largest squared distance from (qx, qy, qz) to K distinct points (their coordinates
// in px, py, pz at indices idx): K points lie that close, so it bounds d_K^2 from above.
inline float points_bound(const float* px, const float* py, const float* pz, const int64_t* idx, int K, float qx,
                          float qy, float qz) {
  float limit = 0.0f;
  for (int j = 0; j < K; ++j) {
    const int64_t i = idx[j];
    const float d = squared_distance(qx, qy, qz, px[i], py[i], pz[i]);
    limit = d > limit ? d : limit;
  }
  return limit;
}

// The K nearest points of query (qx, qy, qz) from its cell's list; false when
// the query is outside the grid or its list overflowed (the caller falls back).
// `hint`: another upper bound of d_K^2 (points_bound of a nearby query's K
// neighbours: consecutive samples of a ray share most of them), +inf when none;
// the scan admits only candidates within the smaller bound and stops sooner.
inline bool search(const Lists& L, int K, float qx, float qy, float qz, TopK<int64_t, kMaxK>& best,
                   bool avx2 = false, float hint = __builtin_huge_valf()) {
  const int cell = query_cell(L.geom, L.G, qx, qy, qz);
  if (cell < 0 || L.overflow[cell]) return false;
  const float* centre = L.centre.data() + 3 * cell;
  const float* seeds = L.seeds.data() + static_cast<int64_t>(cell) * K * 3;
  float limit = 0.0f;
  for (int j = 0; j < K; ++j) {
    const float d = squared_distance(qx, qy, qz, seeds[3 * j], seeds[3 * j + 1], seeds[3 * j + 2]);
    limit = d > limit ? d : limit;
  }
  limit = hint < limit ? hint : limit;
  const float reach = std::sqrt(squared_distance(qx, qy, qz, centre[0], centre[1], centre[2])) * (1.0f + 1e-5f);
#if defined(GPA_KNN_CELLS_AVX2)
  if (avx2 && K <= 8) {  // the top-K in two vectors (Best8)
    Best8 b8;
    best8_init(b8, K);
    scan_bands(L, cell, qx, qy, qz, limit, reach, b8, true);
    best8_store(b8, best);
    return true;
  }
#endif
  scan_bands(L, cell, qx, qy, qz, limit, reach, best, avx2);
  return true;
}

}  // namespace cells_cpu
}  // namespace knn
}  // namespace gpavatar
