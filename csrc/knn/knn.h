// knn: the K nearest points of every query (the pytorch3d `knn_points` contract).
//
// Args:
//   queries: (B, M, 3) float32, contiguous
//   points:  (B, P, 3) float32, contiguous
//   K:       1 <= K <= min(P, kMaxK)
// Returns:
//   dist2:   (B, M, K) float32, squared Euclidean distances, ascending
//   idx:     (B, M, K) int64, indices into points[b]; ties keep the lower index first
//
// This header holds the arithmetic shared by the CPU loop and the CUDA kernel
// (no torch types), plus the raw-pointer CUDA launcher declaration.
#pragma once

#include "common.h"

namespace gpavatar {
namespace knn {

constexpr int kMaxK = 32;

// Squared distance, evaluated exactly like ((dx*dx + dy*dy) + dz*dz) in torch.
GPA_HD float squared_distance(float qx, float qy, float qz, float px, float py, float pz) {
  const float dx = qx - px, dy = qy - py, dz = qz - pz;
  return sum_of_products3(dx, dx, dy, dy, dz, dz);
}

// A list of the K best (distance, index) pairs seen so far, sorted
// lexicographically, so ties keep the lower index first.
template <typename Index, int Capacity>
struct TopK {
  float dist[Capacity];
  Index idx[Capacity];
  int count;
  int k;
  float worst;  // dist[k-1] once full; +inf before (every candidate enters)

  // Slots not yet filled read (+inf, -1): a list left short (fewer than k
  // candidates that are numbers) ends with a K-th distance that is not below
  // +inf, which sends its query to total_order_knn (below).
  GPA_HD explicit TopK(int k_) : count(0), k(k_), worst(__builtin_huge_valf()) {
    for (int j = 0; j < k_; ++j) {
      dist[j] = __builtin_huge_valf();
      idx[j] = Index(-1);
    }
  }

  // Whether a candidate at distance d can enter when candidates come in
  // increasing index order (an equal distance never displaces a held entry).
  // A NaN distance never enters (it would stop the insertion's shifts and hold
  // its slot for good): NaN pairs rank after every number (total_order_knn).
  GPA_HD bool accepts(float d) const { return d < worst || (count < k && d == d); }

  // Inserts (d, i); the caller has checked that it enters.
  GPA_HD void push(float d, Index i) {
    int j = count < k ? count++ : k - 1;
    while (j > 0 && (dist[j - 1] > d || (dist[j - 1] == d && idx[j - 1] > i))) {
      dist[j] = dist[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    dist[j] = d;
    idx[j] = i;
    if (count == k) worst = dist[k - 1];
  }

  // Candidates in increasing index order (a linear scan).
  GPA_HD void offer(float d, Index i) {
    if (accepts(d)) push(d, i);
  }

  // Candidates in any index order (a spatial search).
  GPA_HD void offer_unordered(float d, Index i) {
    if (accepts(d) || (d == worst && i < idx[k - 1])) push(d, i);
  }
};

// Brute force over points (P, 3) in index order (queries outside a grid, overflowing lists).
template <typename List>
GPA_HD void scan_all(const float* points, int64_t P, float qx, float qy, float qz, List& best) {
  for (int64_t p = 0; p < P; ++p) {
    const float d = squared_distance(qx, qy, qz, points[3 * p], points[3 * p + 1], points[3 * p + 2]);
    if (best.accepts(d)) best.push(d, p);
  }
}

// Non-finite distances (NaN or +inf: non-finite or overflowing coordinates, which
// validate=False lets through).  Every backend returns the K smallest pairs in one
// total order: ascending distance, NaN after +inf, equal distances (NaN with NaN
// too) by the lower index.  The scans above never let a NaN distance in, and the
// cell lists leave out points a K-th distance of +inf would have to order, so a
// query whose K-th distance is not below +inf (a list left short, a NaN query,
// distances that overflow) is answered again by this brute-force scan.  Finite
// input never gets here.
GPA_HD bool needs_total_order(const float* dist, int k) { return !(dist[k - 1] < __builtin_huge_valf()); }

// The K nearest of query q among points (P, 3) in that total order: the pairs
// that are numbers (a scan in index order), then NaN pairs in index order.
template <typename Index>
GPA_HD void total_order_knn(const float* points, int64_t P, float qx, float qy, float qz, int k, float* out_d,
                            Index* out_i) {
  TopK<Index, kMaxK> best(k);
  scan_all(points, P, qx, qy, qz, best);
  for (int j = 0; j < best.count; ++j) {
    out_d[j] = best.dist[j];
    out_i[j] = best.idx[j];
  }
  int j = best.count;
  for (int64_t p = 0; p < P && j < k; ++p) {
    const float d = squared_distance(qx, qy, qz, points[3 * p], points[3 * p + 1], points[3 * p + 2]);
    if (d != d) {
      out_d[j] = d;
      out_i[j++] = static_cast<Index>(p);
    }
  }
}

#if defined(WITH_CUDA)
// Launches total_order_knn for every query of dist2 / idx whose K-th distance is
// not below +inf (one thread per query; the others only read one float).
int launch_total_order_cuda(const float* queries, const float* points, float* dist2, int64_t* idx, int64_t B,
                            int64_t M, int64_t P, int K, void* stream);

// Launches the CUDA kernel on `stream` (a cudaStream_t).  Returns a CUDA error
// code (0 on success).
int launch_knn_cuda(const float* queries, const float* points, float* dist2, int64_t* idx,
                    int64_t B, int64_t M, int64_t P, int K, void* stream);
#endif

}  // namespace knn
}  // namespace gpavatar
