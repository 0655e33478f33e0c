// knn on the CPU, parallel over queries.  Three exact methods (choose_method):
// the per-cell candidate lists of knn_cells.h (knn_cells_cpu.h) for large query
// sets, the shell search on a uniform grid of knn_grid.h for small ones (and for
// the queries the lists leave: outside their grid or in an overflowing cell),
// and brute force over a structure-of-arrays copy for few points.  All offer
// distances computed by knn.h to a top-K list ordered by (distance, index), so
// the result equals the brute-force reference bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <climits>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "knn/knn.h"
#include "knn/knn_grid.h"
#include "knn/knn_cells_cpu.h"
#include "knn/knn_cells_cuda_layout.h"
#include "ops.h"

namespace gpavatar {
namespace knn {

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

Call knn_call(const at::Tensor& queries_in, const at::Tensor& points_in, int64_t K) {
  Call c;
  c.queries = queries_in.contiguous();
  c.points = points_in.contiguous();
  c.B = c.queries.size(0);
  c.M = c.queries.size(1);
  c.P = c.points.size(1);
  c.dist2 = at::empty({c.B, c.M, K}, c.queries.options());
  c.idx = at::empty({c.B, c.M, K}, c.queries.options().dtype(at::kLong));
  return c;
}

void check_index_inputs(const at::Tensor& points, const at::Tensor& query_box, int64_t K) {
  check_float_tensor(points, "points", 3, "(B, P, 3)");
  TORCH_CHECK_VALUE(points.size(2) == 3, msg("points must have shape (B, P, 3), got ", shape_of(points)));
  check_float_tensor(query_box, "query_box", 2, "(B, 6)");
  check_same_device(points, "points", query_box, "query_box");
  TORCH_CHECK_VALUE(query_box.size(0) == points.size(0) && query_box.size(1) == 6,
                    msg("query_box must have shape (", points.size(0), ", 6), got ", shape_of(query_box)));
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, msg("K must be in [1, ", kMaxK, "], got ", K));
  TORCH_CHECK_VALUE(K <= points.size(1), msg("K must be <= the number of points P = ",
                    points.size(1), ", got K = ", K));
}

int check_index(at::TensorList index, const at::Tensor& queries, const at::Tensor& points, int64_t K) {
  const int64_t B = points.size(0);
  TORCH_CHECK_VALUE(index.size() == 6, msg("index must be the 6 tensors of knn_index, got ", index.size()));
  const char* names[6] = {"geom", "offset", "cand", "cell_bound", "band_count", "seeds"};
  const c10::ScalarType types[6] = {at::kFloat, at::kLong, at::kFloat, at::kFloat, at::kInt, at::kFloat};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK_VALUE(index[i].device() == queries.device() && index[i].scalar_type() == types[i] &&
                          index[i].is_contiguous(),
                      msg("index: ", names[i], " must be a contiguous ", c10::toString(types[i]), " tensor on ",
                          queries.device(), " (knn_index's output)"));
  }
  const int64_t cells = B > 0 ? index[3].numel() / B : 0;
  int G = 0;
  while (static_cast<int64_t>(G + 1) * (G + 1) * (G + 1) <= cells) ++G;
  const bool ok = B > 0 && static_cast<int64_t>(G) * G * G == cells && index[3].numel() == B * cells &&
                  index[0].numel() == B * kCellGeomStride && index[1].numel() == B * cells + 1 &&
                  index[2].dim() == 2 && index[2].size(1) == 4 && index[4].numel() == B * cells * kCellBands &&
                  index[5].numel() == B * cells * K * 4;
  TORCH_CHECK_VALUE(ok || B == 0, msg("index does not match these points (B = ", B, ") and K = ", K,
                                      ": build it with knn_index(points, query_box, K)"));
  return G;
}

GridTensors build_grid(const at::Tensor& points) {
  const int64_t B = points.size(0), P = points.size(1);
  GridTensors g;
  g.lo = points.amin(1).contiguous();  // (B, 3)
  const at::Tensor extent = points.amax(1).to(at::kDouble) - g.lo.to(at::kDouble);
  // About kGridPointsPerCell points per cell, at most 256 cells per axis.
  const double side = std::min(256.0, std::max(1.0, std::cbrt(P / kGridPointsPerCell)));
  // An axis is gridded only when its extent is finite and >= kMinGridExtent.  Below it the
  // cell size and its inverse stop being safe float32 numbers (a 1e-40 extent gives
  // inv_cell = inf and NaN bins) and the squared distances underflow anyway; such an axis
  // is flat: one cell, inv_cell = 0, and cell = its extent, so lo + cell still bounds the
  // points for the search's stopping bound.  All three axes flat = brute force (one cell
  // scanned in index order).  NaN / inf extents (only with unvalidated input) are flat too,
  // with an infinite cell: lo + cell then bounds the points (a cell of 0 there made the
  // stopping bound count an infinite point as beyond the grid, and stop too early).
  const at::Tensor flat = (extent >= kMinGridExtent).logical_and(extent.isfinite()).logical_not();
  const at::Tensor dims = at::where(flat, 1.0, std::floor(side)).to(extent.options());
  g.dims = dims.to(at::kInt).contiguous();
  g.cell = at::where(flat, at::where(extent.isfinite(), extent, INFINITY), extent / dims)
               .to(at::kFloat).contiguous();
  g.inv_cell = at::where(flat, 0.0, dims / extent).to(at::kFloat).contiguous();

  // Cell of every point, as grid_cell_of computes it: NaN and t <= 0 -> 0, t >= dims - 1 ->
  // dims - 1 (clamped in float before the integer conversion, so no input can give an
  // out-of-range cell).
  const at::Tensor t = (points - g.lo.unsqueeze(1)) * g.inv_cell.unsqueeze(1);  // (B, P, 3)
  const at::Tensor top = (g.dims - 1).to(at::kFloat).unsqueeze(1);
  const at::Tensor c = at::minimum(at::where(t > 0.0, t, 0.0), top).floor().to(at::kLong);
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

// GPAVATAR_KNN = brute | grid | cells | auto (default); GPAVATAR_KNN_GRID=0 is the
// older spelling of brute.  auto: brute force below kGridMinPoints points, the
// cell lists for large query sets, the shell-search grid in between.
Method choose_method(int64_t M, int64_t P, int64_t cells_min_queries, Method small) {
  const char* grid_env = std::getenv("GPAVATAR_KNN_GRID");
  if (grid_env != nullptr && grid_env[0] == '0') return Method::kBrute;
  const char* env = std::getenv("GPAVATAR_KNN");
  const std::string name = env == nullptr ? "auto" : env;
  if (name == "brute") return Method::kBrute;
  if (name == "grid") return Method::kGrid;
  if (name == "cells") return Method::kCells;
  TORCH_CHECK_VALUE(name == "auto" || name.empty(),
                    msg("GPAVATAR_KNN must be one of auto, brute, grid, cells; got '", name, "'"));
  if (P < kGridMinPoints) return Method::kBrute;
  return M >= cells_min_queries ? Method::kCells : small;
}

int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= lo && v <= hi,
                    msg(name, " must be an integer in [", lo, ", ", hi, "], got '", env, "'"));
  return v;
}

int cuda_search_mode() {
  const std::string name =
      env_choice("GPAVATAR_KNN_CUDA_SEARCH", {"banded", "unrolled", "buffered", "grouped"}, "banded");
  return name == "unrolled" ? kSearchUnrolled
         : name == "buffered" ? kSearchBuffered
         : name == "grouped" ? kSearchGrouped
                             : kSearchBanded;
}

Build cuda_build() {
  const std::string name = env_choice("GPAVATAR_KNN_CUDA_BUILD", {"flat", "two_level", "one_pass"}, "two_level");
  return name == "flat" ? Build::kFlat : (name == "one_pass" ? Build::kOnePass : Build::kTwoLevel);
}

bool cuda_match_compaction() {
  return env_choice("GPAVATAR_KNN_CUDA_COMPACT", {"ballot", "match"}, "ballot") == "match";
}

int cuda_list_order() {
  const std::string name = env_choice("GPAVATAR_KNN_CUDA_ORDER", {"box", "centre"}, "box");
  return name == "centre" ? kOrderCentre : kOrderBox;
}

namespace {

// Cells per axis of the CPU lists: the build grows as G^3, the scan shrinks with G.
// Measured on render, uniform and clustered samples of the procedural head (P = 5023,
// K = 8, 2 Xeon threads, with the previous query's bound): the best G is 2 up to 2048
// queries (render 1.20 ms against 1.45 at G = 3), 2-3 at 4096, 3 at 8192 (2.82 against
// 3.04 ms at G = 4), 4 at 16384, 5 at 32768-65536 (render 7.9 against 9.1 ms at G = 6 at
// 32768, 13.7 against 14.3 at 65536), 8-10 from 2^18.
// GPAVATAR_KNN_CPU_VARIANT = auto (default: avx2 where the CPU has it) | avx2 | scalar:
// which loop scans the cell lists (same results; the tests run both).
bool use_avx2_scan() {
  const std::string name = env_choice("GPAVATAR_KNN_CPU_VARIANT", {"auto", "avx2", "scalar"}, "auto");
#if defined(GPA_KNN_CELLS_AVX2)
  TORCH_CHECK_VALUE(name != "avx2" || cells_cpu::cpu_has_avx2(), "GPAVATAR_KNN_CPU_VARIANT=avx2 needs a CPU with AVX2");
  return name != "scalar" && cells_cpu::cpu_has_avx2();
#else
  TORCH_CHECK_VALUE(name != "avx2", "GPAVATAR_KNN_CPU_VARIANT=avx2 needs an x86-64 build");
  return false;
#endif
}

int cells_per_axis(int64_t M) {
  const int fallback = M < 3072 ? 2 : M < 12288 ? 3 : M < 24576 ? 4 : M < (int64_t{1} << 17) ? 5
                     : M < (int64_t{1} << 18) ? 6 : 10;
  return static_cast<int>(env_int("GPAVATAR_KNN_CELLS", fallback, 1, 64));
}

// Brute force over a structure-of-arrays copy of one batch element's points.
void brute_force(const float* px, const float* py, const float* pz, int64_t P, float qx, float qy, float qz,
                 TopK<int64_t, kMaxK>& best) {
  constexpr int64_t kBlock = 256;
  float block[kBlock];
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
}

// The CUDA-layout scans (GPAVATAR_KNN_CUDA_SEARCH) of every query over `lists`; the queries
// the CUDA path gives to its brute-force bucket are appended to `rest` (in order).
void search_view(const cuda_layout::View& lists, const float* q, int64_t B, int64_t M, int k, float* out_d,
                 int64_t* out_i, std::vector<int64_t>& rest) {
  const int search = cuda_search_mode();
  const int order = cuda_list_order();
  const int capacity = k <= 8 ? 8 : (k <= 16 ? 16 : kMaxK);
  const int cap = static_cast<int>(env_int("GPAVATAR_KNN_BUFFER", buffer_slots(capacity), k + 1, 1 << 16));
  std::vector<char> left(B * M, 0);
  at::parallel_for(0, B * M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t qi = begin; qi < end; ++qi) {
      const float x = q[qi * 3], y = q[qi * 3 + 1], z = q[qi * 3 + 2];
      float* d = out_d + qi * k;
      int64_t* i = out_i + qi * k;
      const bool ok =
          capacity == 8 ? cuda_layout::search<8>(lists, qi / M, x, y, z, search, cap, order, d, i)
          : capacity == 16 ? cuda_layout::search<16>(lists, qi / M, x, y, z, search, cap, order, d, i)
                           : cuda_layout::search<kMaxK>(lists, qi / M, x, y, z, search, cap, order, d, i);
      if (!ok) left[qi] = 1;
    }
  });
  for (int64_t qi = 0; qi < B * M; ++qi)
    if (left[qi]) rest.push_back(qi);
}

// Queries whose K-th distance is not below +inf (non-finite or overflowing input only)
// answered again in the total order of knn.h; returns the outputs.
std::tuple<at::Tensor, at::Tensor> total_order(const Call& c) {
  const int k = static_cast<int>(c.dist2.size(2));
  const float* q = c.queries.data_ptr<float>();
  const float* pts = c.points.data_ptr<float>();
  float* out_d = c.dist2.data_ptr<float>();
  int64_t* out_i = c.idx.data_ptr<int64_t>();
  at::parallel_for(0, c.B * c.M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t qi = begin; qi < end; ++qi)
      if (needs_total_order(out_d + qi * k, k))
        total_order_knn(pts + (qi / c.M) * c.P * 3, c.P, q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], k,
                        out_d + qi * k, out_i + qi * k);
  });
  return {c.dist2, c.idx};
}

}  // namespace

// knn_index / knn_search on the CPU: the CUDA layout's lists (knn_cells_cuda_layout.h) as tensors,
// for tests of the shared index (the CPU's own knn builds its lists per call).
std::vector<at::Tensor> knn_index_cpu(const at::Tensor& points_in, const at::Tensor& query_box_in, int64_t K) {
  check_index_inputs(points_in, query_box_in, K);
  const at::Tensor points = points_in.contiguous();
  const at::Tensor query_box = query_box_in.to(at::kFloat).contiguous();
  const int64_t B = points.size(0), P = points.size(1);
  const int G = static_cast<int>(env_int("GPAVATAR_KNN_CELLS", kCudaCells, 1, 32));
  const int64_t per_cell = env_int("GPAVATAR_KNN_CELL_BUDGET", cuda_budget_per_cell(G), 0, int64_t{1} << 20);
  cuda_layout::Lists L;
  cuda_layout::build(L, nullptr, points.data_ptr<float>(), B, 0, P, static_cast<int>(K), G, per_cell,
                     cuda_build() != Build::kFlat,
                     static_cast<int>(env_int("GPAVATAR_KNN_PARENT_CAP", kParentCap, 0, kParentCap)),
                     query_box.data_ptr<float>(), cuda_list_order());
  const auto f32 = points.options();
  auto from = [](const auto& v, at::TensorOptions o) {
    return at::from_blob(const_cast<void*>(static_cast<const void*>(v.data())), {static_cast<int64_t>(v.size())},
                         o).clone();
  };
  at::Tensor cand = at::zeros({L.budget, 4}, f32);
  if (!L.entries.empty()) cand.view({-1}).narrow(0, 0, static_cast<int64_t>(L.entries.size())).copy_(from(L.entries, f32));
  return {from(L.geom, f32), from(L.offset, f32.dtype(at::kLong)), cand, from(L.bound, f32),
          from(L.band_count, f32.dtype(at::kInt)), from(L.seeds, f32)};
}

std::tuple<at::Tensor, at::Tensor> knn_search_cpu(const at::Tensor& queries_in, const at::Tensor& points_in,
                                                  int64_t K, at::TensorList index) {
  check_inputs(queries_in, points_in, K);
  const int G = check_index(index, queries_in, points_in, K);
  const Call c = knn_call(queries_in, points_in, K);
  const at::Tensor &queries = c.queries, &points = c.points, &dist2 = c.dist2, &idx = c.idx;
  const int64_t B = c.B, M = c.M, P = c.P;
  if (c.empty()) return {dist2, idx};
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const cuda_layout::View view{G, static_cast<int>(K), cells, index[2].size(0), index[0].data_ptr<float>(),
                               index[3].data_ptr<float>(), index[4].data_ptr<int>(), index[5].data_ptr<float>(),
                               index[1].data_ptr<int64_t>(), index[2].data_ptr<float>()};
  const float* q = queries.data_ptr<float>();
  float* out_d = dist2.data_ptr<float>();
  int64_t* out_i = idx.data_ptr<int64_t>();
  std::vector<int64_t> rest;
  search_view(view, q, B, M, static_cast<int>(K), out_d, out_i, rest);
  const float* pts = points.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(rest.size()), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // the brute-force bucket
      const int64_t qi = rest[r];
      TopK<int64_t, kMaxK> best(static_cast<int>(K));
      scan_all(pts + (qi / M) * P * 3, P, q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], best);
      std::copy(best.dist, best.dist + K, out_d + qi * K);
      std::copy(best.idx, best.idx + K, out_i + qi * K);
    }
  });
  return total_order(c);
}

namespace {

// Inside a knn_cpu_list_cache block (a frame's or a training step's field passes: gpavatar.ops.knn.
// cpu_list_cache) the cell lists of the last few point clouds are kept, so that calls on the same
// points build them once; leaving the last block drops them (a benchmark repeating one frame does not
// reuse the last repeat's lists).  A cell's list depends on the points, K, the cap and the grid; the
// queries only place the grid (their box), and a list holds the K nearest of any location in its
// cell, while a query outside the grid takes the grid / brute-force scan: so lists built for other
// queries give the same neighbours, bit for bit.  An entry is taken when the points are the same
// bytes, K, G and the cap are the same and the grid a build would place for the new queries lies
// inside its grid (else that grid would fit them badly); GPAVATAR_KNN_CPU_CACHE=0 turns it off.
struct CachedLists {
  std::vector<float> points;  // the (3, P) copy the lists were built from
  int K = 0, G = 0;
  int64_t cap = 0;
  std::shared_ptr<const cells_cpu::Lists> lists;
  size_t bytes = 0;  // held by the entry
};
// At most 16 clouds (a batch of 16 frames' points) and 128 MiB (a cloud of 5023 points at
// G = 10 holds about 8 MiB of lists).
constexpr size_t kListCacheSize = 16;
constexpr size_t kListCacheBytes = size_t{128} << 20;
std::mutex list_cache_mutex;
std::vector<CachedLists> list_cache;  // least recently used first
int64_t list_cache_blocks = 0;        // blocks entered and not yet left (under the mutex)

bool list_cache_on() {
  std::lock_guard<std::mutex> lock(list_cache_mutex);
  return list_cache_blocks > 0;
}

size_t lists_bytes(const cells_cpu::Lists& L) {
  return L.band_start.size() * sizeof(int64_t) + L.index.size() * sizeof(int) + L.overflow.size() +
         (L.band_lo.size() + L.centre.size() + L.seeds.size() + L.x.size() + L.y.size() + L.z.size()) * sizeof(float);
}

// Whether the grid a build would place for these queries (geom_new) lies inside the grid of geom,
// slivers included (a flat axis: only its one value).
bool grid_inside_grid(const float* geom_new, const float* geom, int G) {
  for (int a = 0; a < 3; ++a) {
    const float lo = geom[a] - geom[9 + a], hi = grid_top(geom, G, a) + geom[9 + a];
    const float lo_new = geom_new[a], hi_new = grid_top(geom_new, G, a);
    if (!(lo_new >= lo && hi_new <= hi)) return false;
  }
  return true;
}

std::shared_ptr<const cells_cpu::Lists> cell_lists(const float* px, int64_t P, const float* q, int64_t M, int K,
                                                   int G, int64_t cap, bool avx2) {
  const bool use_cache = env_int("GPAVATAR_KNN_CPU_CACHE", 1, 0, 1) == 1 && list_cache_on();
  float geom[kCellGeomStride];
  cells_cpu::grid_geometry(geom, px, px + P, px + 2 * P, P, q, M, G);
  if (use_cache) {
    const size_t point_bytes = static_cast<size_t>(3 * P) * sizeof(float);
    std::lock_guard<std::mutex> lock(list_cache_mutex);
    for (auto it = list_cache.begin(); it != list_cache.end(); ++it) {
      if (it->K == K && it->G == G && it->cap == cap && static_cast<int64_t>(it->points.size()) == 3 * P &&
          std::memcmp(it->points.data(), px, point_bytes) == 0 && grid_inside_grid(geom, it->lists->geom, G)) {
        CachedLists hit = std::move(*it);
        list_cache.erase(it);
        list_cache.push_back(std::move(hit));
        return list_cache.back().lists;
      }
    }
  }
  auto lists = std::make_shared<cells_cpu::Lists>();
  cells_cpu::build(*lists, px, px + P, px + 2 * P, P, geom, K, G, cap, avx2);
  const size_t bytes = lists_bytes(*lists) + static_cast<size_t>(3 * P) * sizeof(float);
  if (use_cache && bytes <= kListCacheBytes) {
    std::lock_guard<std::mutex> lock(list_cache_mutex);
    if (list_cache_blocks == 0) return lists;  // the block was left meanwhile
    size_t held = bytes;
    for (const CachedLists& e : list_cache) held += e.bytes;
    while (!list_cache.empty() && (list_cache.size() >= kListCacheSize || held > kListCacheBytes)) {
      held -= list_cache.front().bytes;
      list_cache.erase(list_cache.begin());
    }
    list_cache.push_back(CachedLists{std::vector<float>(px, px + 3 * P), K, G, cap, lists, bytes});
  }
  return lists;
}

}  // namespace

int64_t knn_cpu_list_cache(bool on) {
  std::lock_guard<std::mutex> lock(list_cache_mutex);
  const int64_t held = static_cast<int64_t>(list_cache.size());
  if (on) {
    ++list_cache_blocks;
  } else {
    TORCH_CHECK_VALUE(list_cache_blocks > 0, "knn_cpu_list_cache(false) without a block to leave");
    if (--list_cache_blocks == 0) list_cache.clear();
  }
  return held;
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries_in,
                                           const at::Tensor& points_in, int64_t K) {
  check_inputs(queries_in, points_in, K);
  const Call c = knn_call(queries_in, points_in, K);
  const at::Tensor &queries = c.queries, &points = c.points, &dist2 = c.dist2, &idx = c.idx;
  const int64_t B = c.B, M = c.M, P = c.P;
  if (c.empty()) return {dist2, idx};

  const float* q = queries.data_ptr<float>();
  float* out_d = dist2.data_ptr<float>();
  int64_t* out_i = idx.data_ptr<int64_t>();
  const int k = static_cast<int>(K);
  const Method method = choose_method(M, P, kCellsMinQueriesCpu);
  const at::Tensor soa = points.transpose(1, 2).contiguous();  // (B, 3, P)
  const float* s = soa.data_ptr<float>();
  auto write = [&](int64_t qi, const TopK<int64_t, kMaxK>& best) {
    std::copy(best.dist, best.dist + k, out_d + qi * k);
    std::copy(best.idx, best.idx + k, out_i + qi * k);
  };

  // Queries the cell lists leave to the grid or brute force (outside the grid,
  // overflowing lists); all of them for the other methods.
  std::vector<int64_t> rest;
  const std::string layout = env_choice("GPAVATAR_KNN_LAYOUT", {"cpu", "cuda"}, "cpu");
  if (method == Method::kCells && layout == "cuda") {
    // The CUDA pipeline's lists and scans (knn_cells_cuda_layout.h): tests and diagnostics.
    cuda_layout::Lists lists;
    const int cuda_cells = static_cast<int>(env_int("GPAVATAR_KNN_CELLS", kCudaCells, 1, 32));
    const int64_t per_cell = env_int("GPAVATAR_KNN_CELL_BUDGET", cuda_budget_per_cell(cuda_cells), 0, int64_t{1} << 20);
    const bool two_level = cuda_build() != Build::kFlat;
    const int order = cuda_list_order();
    (void)cuda_match_compaction();  // checked like the other CUDA switches (the same lists either way)
    cuda_layout::build(lists, q, points.data_ptr<float>(), B, M, P, k, cuda_cells, per_cell, two_level,
                       static_cast<int>(env_int("GPAVATAR_KNN_PARENT_CAP", kParentCap, 0, kParentCap)), nullptr,
                       order);
    if (two_level && env_int("GPAVATAR_KNN_VERIFY_LISTS", 0, 0, 1) == 1) {
      // Tests: the two-level lists must be those of the flat build, entry for entry.
      cuda_layout::Lists flat;
      cuda_layout::build(flat, q, points.data_ptr<float>(), B, M, P, k, cuda_cells, per_cell, false, kParentCap,
                         nullptr, order);
      TORCH_CHECK(flat.bound == lists.bound && flat.band_count == lists.band_count &&
                      flat.offset == lists.offset && flat.entries == lists.entries,
                  "knn: the two-level cell lists differ from the flat build's");
    }
    search_view(cuda_layout::view(lists), q, B, M, k, out_d, out_i, rest);
  } else if (method == Method::kCells) {
    const int G = cells_per_axis(M);
    const bool avx2 = use_avx2_scan();
    const int64_t cap = env_int("GPAVATAR_KNN_CELL_CAP", INT64_MAX, 0, INT64_MAX);
    const bool use_hint = env_int("GPAVATAR_KNN_CPU_HINT", 1, 0, 1) == 1;
    std::vector<char> left(B * M, 0);
    for (int64_t b = 0; b < B; ++b) {
      const float* px = s + b * 3 * P;
      const std::shared_ptr<const cells_cpu::Lists> shared = cell_lists(px, P, q + b * M * 3, M, k, G, cap, avx2);
      const cells_cpu::Lists& lists = *shared;
      at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
        int64_t prev = -1;  // the last query of this range with its neighbours written
        for (int64_t m = begin; m < end; ++m) {
          const int64_t qi = b * M + m;
          TopK<int64_t, kMaxK> best(k);
          const float qx = q[qi * 3], qy = q[qi * 3 + 1], qz = q[qi * 3 + 2];
          // The previous query's neighbours bound this one's d_K (the samples of a ray are consecutive):
          // taken when it lies within its own d_K of this one (elsewhere the cell's seeds do as well)
          // and that d_K is finite (with non-finite points a list can hold fewer than K points: the
          // empty slots, +inf and index INT_MAX, are left to total_order).
          float hint = __builtin_huge_valf();
          const float prev_dk = prev < 0 ? __builtin_huge_valf() : out_d[prev * k + k - 1];
          if (use_hint && prev_dk < __builtin_huge_valf() &&
              squared_distance(qx, qy, qz, q[prev * 3], q[prev * 3 + 1], q[prev * 3 + 2]) <= prev_dk)
            hint = cells_cpu::points_bound(px, px + P, px + 2 * P, out_i + prev * k, k, qx, qy, qz);
          if (cells_cpu::search(lists, k, qx, qy, qz, best, avx2, hint)) {
            write(qi, best);
            prev = qi;
          } else {
            left[qi] = 1;
          }
        }
      });
    }
    for (int64_t qi = 0; qi < B * M; ++qi)
      if (left[qi]) rest.push_back(qi);
  }
  const int64_t n_rest = method == Method::kCells ? static_cast<int64_t>(rest.size()) : B * M;
  if (n_rest == 0) return total_order(c);
  auto query_of = [&](int64_t r) { return method == Method::kCells ? rest[r] : r; };

  if (method == Method::kGrid || (method == Method::kCells && n_rest >= kGridMinPoints && P >= kGridMinPoints)) {
    const GridTensors grid = build_grid(points);
    at::parallel_for(0, n_rest, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t qi = query_of(r);
        TopK<int64_t, kMaxK> best(k);
        grid_search(grid.view, qi / M, q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], best);
        write(qi, best);
      }
    });
    return total_order(c);
  }
  at::parallel_for(0, n_rest, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t qi = query_of(r);
      const float* px = s + (qi / M) * 3 * P;
      TopK<int64_t, kMaxK> best(k);
      brute_force(px, px + P, px + 2 * P, P, q[qi * 3], q[qi * 3 + 1], q[qi * 3 + 2], best);
      write(qi, best);
    }
  });
  return total_order(c);
}

}  // namespace knn
}  // namespace gpavatar

namespace gpavatar {
namespace knn {
namespace {

// knn_index_applies: the CUDA path searches cell lists whenever choose_method picks them for a
// large query set (GPAVATAR_KNN auto from kGridMinPoints points, or cells; not GPAVATAR_KNN_GRID=0),
// with or without an index; the CPU only in its CUDA layout (GPAVATAR_KNN_LAYOUT=cuda).
bool knn_index_applies(const at::Tensor& points) {
  TORCH_CHECK_VALUE(points.dim() == 3, msg("points must have shape (B, P, 3), got ", shape_of(points)));
  if (choose_method(std::numeric_limits<int64_t>::max(), points.size(1)) != Method::kCells) return false;
  if (points.is_cuda()) return true;
  const char* layout = std::getenv("GPAVATAR_KNN_LAYOUT");
  return points.is_cpu() && layout != nullptr && std::string(layout) == "cuda";
}

}  // namespace
}  // namespace knn
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CompositeExplicitAutograd, m) {
  m.impl("knn_index_applies", &gpavatar::knn::knn_index_applies);
}

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) {
  m.impl("knn", &gpavatar::knn::knn_cpu);
  m.impl("knn_index", &gpavatar::knn::knn_index_cpu);
  m.impl("knn_search", &gpavatar::knn::knn_search_cpu);
}
