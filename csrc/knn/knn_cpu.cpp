// knn on the CPU: brute force over the points of each batch element, parallel
// over queries; the points are laid out structure-of-arrays so the distance
// block vectorizes, then each distance is offered to a sorted top-K list.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "knn/knn.h"
#include "ops.h"

namespace gpavatar {
namespace knn {

void check_inputs(const at::Tensor& queries, const at::Tensor& points, int64_t K) {
  check_float_tensor(queries, "queries", 3, "(B, M, 3)");
  check_float_tensor(points, "points", 3, "(B, P, 3)");
  check_same_device(queries, "queries", points, "points");
  TORCH_CHECK_VALUE(queries.size(2) == 3, "queries must have shape (B, M, 3), got ",
                    queries.sizes());
  TORCH_CHECK_VALUE(points.size(2) == 3, "points must have shape (B, P, 3), got ",
                    points.sizes());
  TORCH_CHECK_VALUE(queries.size(0) == points.size(0),
                    "queries and points must have the same batch size B, got ",
                    queries.size(0), " and ", points.size(0));
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, "K must be in [1, ", kMaxK, "], got ", K);
  TORCH_CHECK_VALUE(K <= points.size(1), "K must be <= the number of points P = ",
                    points.size(1), ", got K = ", K);
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries_in,
                                           const at::Tensor& points_in, int64_t K) {
  check_inputs(queries_in, points_in, K);
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor points = points_in.contiguous();
  const int64_t B = queries.size(0), M = queries.size(1), P = points.size(1);
  at::Tensor dist2 = at::empty({B, M, K}, queries.options());
  at::Tensor idx = at::empty({B, M, K}, queries.options().dtype(at::kLong));
  if (B == 0 || M == 0) return {dist2, idx};

  // Structure-of-arrays copy of the points: (B, 3, P).
  const at::Tensor soa = points.transpose(1, 2).contiguous();
  const float* q = queries.data_ptr<float>();
  const float* s = soa.data_ptr<float>();
  float* out_d = dist2.data_ptr<float>();
  int64_t* out_i = idx.data_ptr<int64_t>();
  const int k = static_cast<int>(K);
  constexpr int64_t kBlock = 256;

  at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
    float block[kBlock];
    for (int64_t qi = begin; qi < end; ++qi) {
      const int64_t b = qi / M;
      const float qx = q[qi * 3], qy = q[qi * 3 + 1], qz = q[qi * 3 + 2];
      const float* px = s + b * 3 * P;
      const float* py = px + P;
      const float* pz = py + P;
      TopK<int64_t, kMaxK> best(k);
      for (int64_t start = 0; start < P; start += kBlock) {
        const int64_t n = std::min(kBlock, P - start);
        float block_min = __builtin_huge_valf();
        for (int64_t t = 0; t < n; ++t) {
          block[t] = squared_distance(qx, qy, qz, px[start + t], py[start + t], pz[start + t]);
          block_min = std::min(block_min, block[t]);
        }
        // Once the list is full most blocks hold no candidate: skip their scan.
        if (!best.accepts(block_min)) continue;
        for (int64_t t = 0; t < n; ++t) best.offer(block[t], start + t);
      }
      for (int j = 0; j < k; ++j) {
        out_d[qi * k + j] = best.dist[j];
        out_i[qi * k + j] = best.idx[j];
      }
    }
  });
  return {dist2, idx};
}

}  // namespace knn
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) { m.impl("knn", &gpavatar::knn::knn_cpu); }
