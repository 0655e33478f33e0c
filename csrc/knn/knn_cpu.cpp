// knn on the CPU, parallel over queries.  From kGridMinPoints points on, a
// uniform grid per batch element and an exact shell-by-shell search; below,
// brute force over a structure-of-arrays copy (the distance block vectorizes).
// Both offer distances computed by knn.h to a top-K list ordered by
// (distance, index), so the result equals the brute-force reference bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

namespace {

// A uniform grid over the points of one batch element: cell (x, y, z) holds
// points sorted[start[c] .. start[c + 1]) (structure of arrays, with their
// original indices).  About kPointsPerCell points per cell on average.
struct Grid {
  static constexpr double kPointsPerCell = 2.0;
  float lo[3];
  float cell[3];      // cell size per axis (0 for a flat axis: one cell)
  float inv_cell[3];  // 1 / cell, or 0
  int n[3];           // cells per axis
  std::vector<int64_t> start;
  std::vector<float> x, y, z;
  std::vector<int64_t> index;

  int cell_of(float v, int axis) const {
    const float t = (v - lo[axis]) * inv_cell[axis];
    if (!(t > 0.0f)) return 0;
    return std::min(n[axis] - 1, static_cast<int>(t));
  }

  int64_t linear(int cx, int cy, int cz) const {
    return (static_cast<int64_t>(cz) * n[1] + cy) * n[0] + cx;
  }

  Grid(const float* pts, int64_t P) {
    float hi[3];
    for (int a = 0; a < 3; ++a) lo[a] = hi[a] = pts[a];
    for (int64_t i = 0; i < P; ++i) {
      for (int a = 0; a < 3; ++a) {
        lo[a] = std::min(lo[a], pts[i * 3 + a]);
        hi[a] = std::max(hi[a], pts[i * 3 + a]);
      }
    }
    const double side = std::max(1.0, std::cbrt(static_cast<double>(P) / kPointsPerCell));
    for (int a = 0; a < 3; ++a) {
      const double extent = static_cast<double>(hi[a]) - lo[a];
      n[a] = extent > 0.0 ? static_cast<int>(std::min(side, 256.0)) : 1;
      cell[a] = n[a] > 1 ? static_cast<float>(extent / n[a]) : 0.0f;
      inv_cell[a] = n[a] > 1 ? static_cast<float>(n[a] / extent) : 0.0f;
    }
    const int64_t cells = static_cast<int64_t>(n[0]) * n[1] * n[2];
    std::vector<int64_t> cell_id(P);
    start.assign(cells + 1, 0);
    for (int64_t i = 0; i < P; ++i) {
      cell_id[i] = linear(cell_of(pts[i * 3], 0), cell_of(pts[i * 3 + 1], 1),
                          cell_of(pts[i * 3 + 2], 2));
      ++start[cell_id[i] + 1];
    }
    for (int64_t c = 0; c < cells; ++c) start[c + 1] += start[c];
    x.resize(P);
    y.resize(P);
    z.resize(P);
    index.resize(P);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < P; ++i) {
      const int64_t slot = fill[cell_id[i]]++;
      x[slot] = pts[i * 3];
      y[slot] = pts[i * 3 + 1];
      z[slot] = pts[i * 3 + 2];
      index[slot] = i;
    }
  }

  // Offers the points of one cell.
  template <typename List>
  void scan_cell(int64_t c, float qx, float qy, float qz, List& best) const {
    for (int64_t s = start[c]; s < start[c + 1]; ++s)
      best.offer_unordered(squared_distance(qx, qy, qz, x[s], y[s], z[s]), index[s]);
  }

  // Exact K nearest: scan shells of cells (Chebyshev radius r around the
  // query's cell) until every unvisited point is provably farther than the
  // K-th best found.
  template <typename List>
  void search(float qx, float qy, float qz, List& best) const {
    const float q[3] = {qx, qy, qz};
    int c[3];
    for (int a = 0; a < 3; ++a) c[a] = cell_of(q[a], a);
    for (int r = 0;; ++r) {
      int lo_c[3], hi_c[3];
      for (int a = 0; a < 3; ++a) {
        lo_c[a] = std::max(0, c[a] - r);
        hi_c[a] = std::min(n[a] - 1, c[a] + r);
      }
      for (int cz = lo_c[2]; cz <= hi_c[2]; ++cz) {
        for (int cy = lo_c[1]; cy <= hi_c[1]; ++cy) {
          const bool face = std::abs(cz - c[2]) == r || std::abs(cy - c[1]) == r;
          if (face) {
            for (int cx = lo_c[0]; cx <= hi_c[0]; ++cx) scan_cell(linear(cx, cy, cz), qx, qy, qz, best);
          } else {  // interior row of the shell: only its two ends are new
            if (c[0] - r >= 0) scan_cell(linear(c[0] - r, cy, cz), qx, qy, qz, best);
            if (r > 0 && c[0] + r < n[0]) scan_cell(linear(c[0] + r, cy, cz), qx, qy, qz, best);
          }
        }
      }
      // Distance from q to the nearest open face of the visited box (a face on
      // the grid's border hides no point), shrunk by a sliver of a cell: binning
      // rounds (v - lo) * inv_cell, so a point may sit a hair across its face.
      double gap = __builtin_huge_val();
      bool open = false;
      for (int a = 0; a < 3; ++a) {
        const double sliver = 1e-3 * cell[a];
        if (lo_c[a] > 0) {
          open = true;
          gap = std::min(gap, static_cast<double>(q[a]) - (lo[a] + static_cast<double>(lo_c[a]) * cell[a]) - sliver);
        }
        if (hi_c[a] < n[a] - 1) {
          open = true;
          gap = std::min(gap, (lo[a] + static_cast<double>(hi_c[a] + 1) * cell[a]) - q[a] - sliver);
        }
      }
      if (!open) return;  // the whole grid is visited
      // The float distances of those points carry a relative rounding error of a
      // few 1e-7: compare with a 1e-5 relative margin.
      if (best.count == best.k && gap > 0.0 && static_cast<double>(best.worst) < gap * gap * (1.0 - 1e-5))
        return;
    }
  }
};

// Brute force is cheaper than building a grid for few points.
constexpr int64_t kGridMinPoints = 256;

}  // namespace

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

  if (P >= kGridMinPoints) {
    const float* pts = points.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const Grid grid(pts + b * P * 3, P);
      at::parallel_for(b * M, (b + 1) * M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t qi = begin; qi < end; ++qi) {
          TopK<int64_t, kMaxK> best(k);
          grid.search(q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], best);
          std::copy(best.dist, best.dist + k, out_d + qi * k);
          std::copy(best.idx, best.idx + k, out_i + qi * k);
        }
      });
    }
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
