// knn on the CPU, parallel over queries.  From kGridMinPoints points on, a
// uniform grid per batch element and the exact shell search of knn_grid.h
// (shared with the CUDA kernel); below, brute force over a structure-of-arrays
// copy (the distance block vectorizes).
// Both offer distances computed by knn.h to a top-K list ordered by
// (distance, index), so the result equals the brute-force reference bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "knn/knn.h"
#include "knn/knn_grid.h"
#include "ops.h"

namespace gpavatar {
namespace knn {

bool use_grid(int64_t P) {
  const char* env = std::getenv("GPAVATAR_KNN_GRID");  // "0": always brute force (debugging)
  return P >= kGridMinPoints && !(env != nullptr && env[0] == '0');
}

void check_inputs(const at::Tensor& queries, const at::Tensor& points, int64_t K) {
  check_float_tensor(queries, "queries", 3, "(B, M, 3)");
  check_float_tensor(points, "points", 3, "(B, P, 3)");
  check_same_device(queries, "queries", points, "points");
  TORCH_CHECK_VALUE(queries.size(2) == 3, msg("queries must have shape (B, M, 3), got ",
                    shape_of(queries)));
  TORCH_CHECK_VALUE(points.size(2) == 3, msg("points must have shape (B, P, 3), got ",
                    shape_of(points)));
  TORCH_CHECK_VALUE(queries.size(0) == points.size(0), msg("queries and points must have the same batch size B, got ",
                    queries.size(0), " and ", points.size(0)));
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, msg("K must be in [1, ", kMaxK, "], got ", K));
  TORCH_CHECK_VALUE(K <= points.size(1), msg("K must be <= the number of points P = ",
                    points.size(1), ", got K = ", K));
}

GridTensors build_grid(const at::Tensor& points) {
  const int64_t B = points.size(0), P = points.size(1);
  GridTensors g;
  g.lo = points.amin(1).contiguous();  // (B, 3)
  const at::Tensor extent = points.amax(1).to(at::kDouble) - g.lo.to(at::kDouble);
  // About kGridPointsPerCell points per cell, at most 256 cells per axis.
  const double side = std::min(256.0, std::max(1.0, std::cbrt(P / kGridPointsPerCell)));
  const at::Tensor flat = extent <= 0.0;
  const at::Tensor dims = at::where(flat, 1.0, std::floor(side)).to(extent.options());
  g.dims = dims.to(at::kInt).contiguous();
  g.cell = at::where(flat, 0.0, extent / dims).to(at::kFloat).contiguous();
  g.inv_cell = at::where(flat, 0.0, dims / extent.clamp_min(1e-300)).to(at::kFloat).contiguous();

  // Cell of every point, as grid_cell_of computes it.
  const at::Tensor t = (points - g.lo.unsqueeze(1)) * g.inv_cell.unsqueeze(1);  // (B, P, 3)
  const at::Tensor top = (g.dims - 1).to(at::kLong).unsqueeze(1);
  const at::Tensor c = at::minimum(t.floor().clamp_min(0.0).to(at::kLong), top);
  const at::Tensor n = g.dims.to(at::kLong);
  const at::Tensor cells = n.prod(1);                 // (B)
  g.cell_offset = (cells.cumsum(0) - cells).contiguous();  // exclusive
  const at::Tensor key = ((c.select(2, 2) * n.select(1, 1).unsqueeze(1) + c.select(2, 1)) *
                              n.select(1, 0).unsqueeze(1) +
                          c.select(2, 0) + g.cell_offset.unsqueeze(1))
                             .reshape({-1});
  const at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const int64_t total_cells = cells.sum().item<int64_t>();
  g.start = at::cat({at::zeros({1}, key.options()), at::bincount(key, {}, total_cells).cumsum(0)})
                .contiguous();
  const at::Tensor sorted = points.reshape({-1, 3}).index_select(0, order);
  g.x = sorted.select(1, 0).contiguous();
  g.y = sorted.select(1, 1).contiguous();
  g.z = sorted.select(1, 2).contiguous();
  g.index = order.remainder(P).contiguous();
  (void)B;
  g.view = GridView{g.lo.data_ptr<float>(),       g.cell.data_ptr<float>(),
                    g.inv_cell.data_ptr<float>(), g.dims.data_ptr<int>(),
                    g.cell_offset.data_ptr<int64_t>(), g.start.data_ptr<int64_t>(),
                    g.x.data_ptr<float>(),        g.y.data_ptr<float>(),
                    g.z.data_ptr<float>(),        g.index.data_ptr<int64_t>()};
  return g;
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

  const float* q = queries.data_ptr<float>();
  float* out_d = dist2.data_ptr<float>();
  int64_t* out_i = idx.data_ptr<int64_t>();
  const int k = static_cast<int>(K);

  if (use_grid(P)) {
    const GridTensors grid = build_grid(points);
    at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t qi = begin; qi < end; ++qi) {
        TopK<int64_t, kMaxK> best(k);
        grid_search(grid.view, qi / M, q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], best);
        std::copy(best.dist, best.dist + k, out_d + qi * k);
        std::copy(best.idx, best.idx + k, out_i + qi * k);
      }
    });
    return {dist2, idx};
  }

  // Few points: brute force over a structure-of-arrays copy (B, 3, P).
  const at::Tensor soa = points.transpose(1, 2).contiguous();
  const float* s = soa.data_ptr<float>();
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
      std::copy(best.dist, best.dist + k, out_d + qi * k);
      std::copy(best.idx, best.idx + k, out_i + qi * k);
    }
  });
  return {dist2, idx};
}

}  // namespace knn
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) { m.impl("knn", &gpavatar::knn::knn_cpu); }
