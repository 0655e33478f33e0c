// knn on CUDA: one thread per query; the points of the batch element stream
// through shared memory in tiles and every thread keeps its own sorted top-K
// (knn.h).  No torch headers here: the launcher takes raw pointers.
#include <cuda_runtime.h>

#include "knn/knn.h"
#include "knn/knn_grid.h"

namespace gpavatar {
namespace knn {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;

template <int Capacity>
__global__ void knn_kernel(const float* __restrict__ queries,  // [B, M, 3]
                           const float* __restrict__ points,   // [B, P, 3]
                           float* __restrict__ dist2,          // [B, M, K]
                           int64_t* __restrict__ idx,          // [B, M, K]
                           int64_t M, int64_t P, int K) {
  __shared__ float tile[3 * kTile];
  const int64_t b = blockIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = m < M;
  const int64_t qi = b * M + m;
  float qx = 0.f, qy = 0.f, qz = 0.f;
  if (active) {
    qx = queries[qi * 3];
    qy = queries[qi * 3 + 1];
    qz = queries[qi * 3 + 2];
  }
  TopK<int, Capacity> best(K);
  const float* pts = points + b * P * 3;
  for (int64_t start = 0; start < P; start += kTile) {
    const int n = static_cast<int>(P - start < kTile ? P - start : kTile);
    __syncthreads();
    for (int t = threadIdx.x; t < 3 * n; t += blockDim.x) tile[t] = pts[start * 3 + t];
    __syncthreads();
    if (active) {
      for (int t = 0; t < n; ++t) {
        const float d =
            squared_distance(qx, qy, qz, tile[3 * t], tile[3 * t + 1], tile[3 * t + 2]);
        if (best.accepts(d)) best.push(d, static_cast<int>(start) + t);
      }
    }
  }
  if (active) {
    for (int j = 0; j < K; ++j) {
      dist2[qi * K + j] = best.dist[j];
      idx[qi * K + j] = best.idx[j];
    }
  }
}

// One thread per query: the shell search of knn_grid.h.
template <int Capacity>
__global__ void knn_grid_kernel(GridView grid,
                                const float* __restrict__ queries,  // [B, M, 3]
                                float* __restrict__ dist2,          // [B, M, K]
                                int64_t* __restrict__ idx,          // [B, M, K]
                                int64_t M, int K) {
  const int64_t b = blockIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= M) return;
  const int64_t qi = b * M + m;
  TopK<int64_t, Capacity> best(K);
  grid_search(grid, b, queries[qi * 3], queries[qi * 3 + 1], queries[qi * 3 + 2], best);
  for (int j = 0; j < K; ++j) {
    dist2[qi * K + j] = best.dist[j];
    idx[qi * K + j] = best.idx[j];
  }
}

// One thread per query: queries whose K-th distance is not below +inf (only
// non-finite or overflowing input) are answered again in the total order of
// knn.h; every other thread reads one float and leaves.
__global__ void total_order_kernel(const float* __restrict__ queries,  // [B, M, 3]
                                   const float* __restrict__ points,   // [B, P, 3]
                                   float* __restrict__ dist2,          // [B, M, K]
                                   int64_t* __restrict__ idx,          // [B, M, K]
                                   int64_t B, int64_t M, int64_t P, int K) {
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (qi >= B * M || !needs_total_order(dist2 + qi * K, K)) return;
  total_order_knn(points + (qi / M) * P * 3, P, queries[qi * 3], queries[qi * 3 + 1], queries[qi * 3 + 2], K,
                  dist2 + qi * K, idx + qi * K);
}

}  // namespace

int launch_total_order_cuda(const float* queries, const float* points, float* dist2, int64_t* idx, int64_t B,
                            int64_t M, int64_t P, int K, void* stream) {
  if (B == 0 || M == 0) return 0;
  const int64_t n = B * M;
  total_order_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(queries, points, dist2, idx, B, M, P, K);
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_grid_cuda(const GridView& grid, const float* queries, float* dist2, int64_t* idx,
                         int64_t B, int64_t M, int K, void* stream) {
  if (B == 0 || M == 0) return 0;
  const dim3 grid_dim(static_cast<unsigned>((M + kThreads - 1) / kThreads),
                      static_cast<unsigned>(B));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (K <= 8) {
    knn_grid_kernel<8><<<grid_dim, kThreads, 0, s>>>(grid, queries, dist2, idx, M, K);
  } else if (K <= 16) {
    knn_grid_kernel<16><<<grid_dim, kThreads, 0, s>>>(grid, queries, dist2, idx, M, K);
  } else {
    knn_grid_kernel<kMaxK><<<grid_dim, kThreads, 0, s>>>(grid, queries, dist2, idx, M, K);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_cuda(const float* queries, const float* points, float* dist2, int64_t* idx,
                    int64_t B, int64_t M, int64_t P, int K, void* stream) {
  if (B == 0 || M == 0) return 0;
  const dim3 grid(static_cast<unsigned>((M + kThreads - 1) / kThreads), static_cast<unsigned>(B));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (K <= 8) {
    knn_kernel<8><<<grid, kThreads, 0, s>>>(queries, points, dist2, idx, M, P, K);
  } else if (K <= 16) {
    knn_kernel<16><<<grid, kThreads, 0, s>>>(queries, points, dist2, idx, M, P, K);
  } else {
    knn_kernel<kMaxK><<<grid, kThreads, 0, s>>>(queries, points, dist2, idx, M, P, K);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace knn
}  // namespace gpavatar
