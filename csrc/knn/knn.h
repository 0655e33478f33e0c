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

  GPA_HD explicit TopK(int k_) : count(0), k(k_), worst(__builtin_huge_valf()) {}

  // Whether a candidate at distance d can enter when candidates come in
  // increasing index order (an equal distance never displaces a held entry).
  GPA_HD bool accepts(float d) const { return count < k || d < worst; }

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

#if defined(WITH_CUDA)
// Launches the CUDA kernel on `stream` (a cudaStream_t).  Returns a CUDA error
// code (0 on success).
int launch_knn_cuda(const float* queries, const float* points, float* dist2, int64_t* idx,
                    int64_t B, int64_t M, int64_t P, int K, void* stream);
#endif

}  // namespace knn
}  // namespace gpavatar
