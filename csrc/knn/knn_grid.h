// Exact K-nearest search on a uniform grid, shared by the CPU loop and the CUDA
// kernel (no torch types).  The grid is built by build_grid (knn_cpu.cpp, with
// tensor ops that run on either device):
//   lo, cell, inv_cell (B, 3) float   grid origin, cell size, 1 / cell size; on a flat axis
//                                      (extent < kMinGridExtent = 1e-15, ops.h) cell is the
//                                      extent (+inf for a NaN / infinite one) and inv_cell 0
//   dims (B, 3) int32                  cells per axis (1 on a flat axis)
//   cell_offset (B) int64              first cell of batch element b in `start`
//   start (total_cells + 1) int64      points of cell c: sorted[start[c] .. start[c + 1])
//   x, y, z (B * P) float              the points sorted by cell (structure of arrays)
//   index (B * P) int64                their index within their batch element
// The search visits shells of cells (Chebyshev radius r around the query's
// cell) and stops once every unvisited point is provably farther than the K-th
// best found, so it returns exactly what the brute-force scan returns.
#pragma once

#include "knn/knn.h"

namespace gpavatar {
namespace knn {

// See the stopping rule in grid_search.
constexpr double kUnderflowMargin = 1e-30;

struct GridView {
  const float* lo;
  const float* cell;
  const float* inv_cell;
  const int* dims;
  const int64_t* cell_offset;
  const int64_t* start;
  const float* x;
  const float* y;
  const float* z;
  const int64_t* index;
};

// Cell of coordinate v along one axis (clamped into the grid; NaN -> 0).
GPA_HD int grid_cell_of(float v, float lo, float inv_cell, int dim) {
  const float t = (v - lo) * inv_cell;
  if (!(t > 0.0f)) return 0;
  const int c = t < static_cast<float>(dim) ? static_cast<int>(t) : dim - 1;
  return c < dim - 1 ? c : dim - 1;
}

template <typename List>
GPA_HD void grid_scan_cell(const GridView& g, int64_t cell, float qx, float qy, float qz,
                           List& best) {
  for (int64_t s = g.start[cell]; s < g.start[cell + 1]; ++s)
    best.offer_unordered(squared_distance(qx, qy, qz, g.x[s], g.y[s], g.z[s]), g.index[s]);
}

template <typename List>
GPA_HD void grid_search(const GridView& g, int64_t b, float qx, float qy, float qz, List& best) {
  const float q[3] = {qx, qy, qz};
  const float* lo = g.lo + 3 * b;
  const float* cell = g.cell + 3 * b;
  const int* n = g.dims + 3 * b;
  const int64_t base = g.cell_offset[b];
  int c[3];
  for (int a = 0; a < 3; ++a) c[a] = grid_cell_of(q[a], lo[a], g.inv_cell[3 * b + a], n[a]);
  for (int r = 0;; ++r) {
    int lo_c[3], hi_c[3];
    for (int a = 0; a < 3; ++a) {
      lo_c[a] = c[a] - r > 0 ? c[a] - r : 0;
      hi_c[a] = c[a] + r < n[a] - 1 ? c[a] + r : n[a] - 1;
    }
    for (int cz = lo_c[2]; cz <= hi_c[2]; ++cz) {
      for (int cy = lo_c[1]; cy <= hi_c[1]; ++cy) {
        const int64_t row = base + (static_cast<int64_t>(cz) * n[1] + cy) * n[0];
        const bool face = cz - c[2] == r || c[2] - cz == r || cy - c[1] == r || c[1] - cy == r;
        if (face) {
          for (int cx = lo_c[0]; cx <= hi_c[0]; ++cx) grid_scan_cell(g, row + cx, qx, qy, qz, best);
        } else {  // an interior row of the shell: only its two ends are new
          if (c[0] - r >= 0) grid_scan_cell(g, row + c[0] - r, qx, qy, qz, best);
          if (r > 0 && c[0] + r < n[0]) grid_scan_cell(g, row + c[0] + r, qx, qy, qz, best);
        }
      }
    }
    // Lower bound on the distance from q to any unvisited point.  Unvisited points
    // lie beyond an open face of the visited box (a face on the grid's border hides
    // no point) and inside the points' bounding box, so for an open face on axis a
    //   dist^2 >= gap_a^2 + sum over the other axes b of out_b^2,
    // gap_a: distance from q to the face along a, out_b: distance from q_b to the
    // box's extent along b (0 inside).  The out_b terms end the search early for
    // queries outside the point cloud (most samples along a ray).  Every term is
    // shrunk by a sliver of a cell: binning rounds (v - lo) * inv_cell, so a point
    // may sit a hair across its face, and lo + n * cell rounds.  (A flat axis has
    // one cell of size = its extent, so [lo, lo + cell] still holds its points.)
    double out2[3];
    for (int a = 0; a < 3; ++a) {
      const double sliver = 1e-3 * cell[a];
      const double hi = lo[a] + static_cast<double>(n[a]) * cell[a];
      const double below = lo[a] - sliver - q[a], above = q[a] - hi - sliver;
      const double out = below > 0.0 ? below : (above > 0.0 ? above : 0.0);
      out2[a] = out * out;
    }
    double bound = 1e300;
    bool open = false, blocked = false;
    for (int a = 0; a < 3; ++a) {
      const double sliver = 1e-3 * cell[a];
      const double side = out2[(a + 1) % 3] + out2[(a + 2) % 3];
      for (int dir = 0; dir < 2; ++dir) {
        const bool is_open = dir == 0 ? lo_c[a] > 0 : hi_c[a] < n[a] - 1;
        if (!is_open) continue;
        open = true;
        const double face = lo[a] + static_cast<double>(dir == 0 ? lo_c[a] : hi_c[a] + 1) * cell[a];
        const double gap = (dir == 0 ? q[a] - face : face - q[a]) - sliver;
        if (!(gap > 0.0)) blocked = true;  // q within a sliver of an open face: keep searching
        const double b2 = gap * gap + side;
        bound = bound < b2 ? bound : b2;
      }
    }
    if (!open) return;  // the whole grid is visited
    // Float distances carry a relative rounding error of a few 1e-7: keep a
    // 1e-5 relative margin.  Tiny distances also underflow: a product below
    // 2^-126 loses its relative precision (and flushes to 0 under FTZ), so a
    // float distance can sit up to a few 1e-38 below its exact value whatever
    // its size.  The absolute margin kUnderflowMargin covers that: without it
    // K neighbours at float distance 0 (a cloud of extent 1e-25, say) would stop
    // the search while unvisited points also round to 0 and win the tie by a
    // lower index.  (Beyond these two margins the bound is exact: fl(d) of an
    // unvisited point >= bound (1 - 4 2^-24) - 4e-38 > worst.)
    if (best.count == best.k && !blocked &&
        static_cast<double>(best.worst) < bound * (1.0 - 1e-5) - kUnderflowMargin)
      return;
  }
}

#if defined(WITH_CUDA)
// One thread per query; dist2 / idx: (B, M, K).  Returns a CUDA error code.
int launch_knn_grid_cuda(const GridView& grid, const float* queries, float* dist2, int64_t* idx,
                         int64_t B, int64_t M, int K, void* stream);
#endif

}  // namespace knn
}  // namespace gpavatar
