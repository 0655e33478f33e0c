// knn on CUDA tensors: input checks, allocation and the launch on the current
// stream (the kernel itself is in knn.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "knn/knn.h"
#include "knn/knn_cells.h"
#include "cuda_check.h"
#include "ops.h"

namespace gpavatar {
namespace knn {
namespace {

// The cell lists of knn_cells.h: every step on the current stream, no host sync
// (the sizes below depend on B, M, P and K only).  The lists (one index) depend on the
// points and the grid's box only, so a caller may build them once (knn_index) and search
// them with several query sets (knn_search): the two field passes of a frame.
struct Index {
  at::Tensor geom, offset, cand, cell_bound, band_count, seeds;
  int G = 0;
};

// The lists over the box of the points joined with `query_box` (B, 6): lo xyz, hi xyz.
Index build_index(const at::Tensor& points, const at::Tensor& query_box, int64_t K, cudaStream_t stream) {
  const int64_t B = points.size(0), P = points.size(1);
  const int G = static_cast<int>(env_int("GPAVATAR_KNN_CELLS", kCudaCells, 1, 32));
  const int64_t cells = static_cast<int64_t>(G) * G * G;
  const int64_t per_cell = env_int("GPAVATAR_KNN_CELL_BUDGET", cuda_budget_per_cell(G), 0, int64_t{1} << 20);
  const auto f32 = points.options();
  const auto i32 = f32.dtype(at::kInt);
  const auto i64 = f32.dtype(at::kLong);
  const at::Tensor bounds = at::cat({points.amin(1), points.amax(1), query_box}, 1).contiguous();
  Index x;
  x.G = G;
  x.geom = at::empty({B, kCellGeomStride}, f32);
  at::Tensor count = at::empty({B * cells}, i32);
  x.offset = at::zeros({B * cells + 1}, i64);
  x.cand = at::empty({B * cells * per_cell, 4}, f32);
  x.cell_bound = at::empty({B * cells}, f32);
  x.band_count = at::empty({B * cells * kCellBands}, i32);
  x.seeds = at::empty({B * cells * K, 4}, f32);
  CellKnnCuda a{};
  a.points = points.data_ptr<float>();
  a.bounds = bounds.data_ptr<float>();
  a.geom = x.geom.data_ptr<float>();
  a.count = count.data_ptr<int>();
  a.offset = x.offset.data_ptr<int64_t>();
  a.cand = x.cand.data_ptr<float>();
  a.cell_bound = x.cell_bound.data_ptr<float>();
  a.band_count = x.band_count.data_ptr<int>();
  a.seeds = x.seeds.data_ptr<float>();
  a.budget = B * cells * per_cell;
  a.B = B;
  a.P = P;
  a.K = static_cast<int>(K);
  a.G = G;
  const Build build = cuda_build();
  a.two_level = build != Build::kFlat;
  a.match = cuda_match_compaction();
  a.list_order = cuda_list_order();
  a.parent_cap = static_cast<int>(env_int("GPAVATAR_KNN_PARENT_CAP", kParentCap, 0, kParentCap));
  if (build == Build::kOnePass) {  // offset[B * cells] is the reservation counter (zeroed)
    check_launch(launch_cell_lists_cuda(a, kListBoth, stream), "knn (cell lists)");
    return x;
  }
  check_launch(launch_cell_lists_cuda(a, kListCount, stream), "knn (cell lists)");
  x.offset.narrow(0, 1, B * cells).copy_(count.to(at::kLong).cumsum(0));
  check_launch(launch_cell_lists_cuda(a, kListFill, stream), "knn (cell lists)");
  // A list that ends past the budget overflows: offset -1 (its queries take the brute-force scan).
  x.offset.narrow(0, 0, B * cells).masked_fill_(x.offset.narrow(0, 1, B * cells) > a.budget, -1);
  return x;
}

// The queries' buckets and the search of an index's lists.
void search_index(const at::Tensor& queries, const at::Tensor& points, int64_t K, const Index& x,
                  at::Tensor& dist2, at::Tensor& idx, cudaStream_t stream) {
  const int64_t B = queries.size(0), M = queries.size(1), P = points.size(1);
  TORCH_CHECK_VALUE(B * M < (int64_t{1} << 31), msg("knn: B * M must be < 2^31 on CUDA, got ", B * M));
  const int64_t cells = static_cast<int64_t>(x.G) * x.G * x.G;
  const int list_order = cuda_list_order();  // lists of another order: their queries scan every point
  const int64_t buckets = B * (cells * query_levels(list_order) + 1);
  const auto i32 = queries.options().dtype(at::kInt);
  const auto i64 = queries.options().dtype(at::kLong);
  at::Tensor bucket_of = at::empty({B * M}, i32);
  at::Tensor bucket_count = at::zeros({buckets}, i32);
  at::Tensor bucket_start = at::zeros({buckets}, i64);
  at::Tensor bucket_fill = at::zeros({buckets}, i32);
  at::Tensor order = at::empty({B * M}, i32);
  CellKnnCuda a{};
  a.queries = queries.data_ptr<float>();
  a.points = points.data_ptr<float>();
  a.dist2 = dist2.data_ptr<float>();
  a.idx = idx.data_ptr<int64_t>();
  a.geom = x.geom.data_ptr<float>();
  a.offset = x.offset.data_ptr<int64_t>();
  a.cand = x.cand.data_ptr<float>();
  a.cell_bound = x.cell_bound.data_ptr<float>();
  a.band_count = x.band_count.data_ptr<int>();
  a.seeds = x.seeds.data_ptr<float>();
  a.search = cuda_search_mode();
  a.list_order = list_order;
  a.budget = x.cand.size(0);
  a.query_cell = bucket_of.data_ptr<int>();
  a.bucket_count = bucket_count.data_ptr<int>();
  a.bucket_start = bucket_start.data_ptr<int64_t>();
  a.bucket_fill = bucket_fill.data_ptr<int>();
  a.order = order.data_ptr<int>();
  a.B = B;
  a.M = M;
  a.P = P;
  a.K = static_cast<int>(K);
  a.G = x.G;
  check_launch(launch_cell_bucket_cuda(a, /*scatter=*/false, stream), "knn (buckets)");
  const at::Tensor sizes = bucket_count.to(at::kLong);
  bucket_start.copy_(sizes.cumsum(0) - sizes);
  check_launch(launch_cell_bucket_cuda(a, /*scatter=*/true, stream), "knn (buckets)");
  check_launch(launch_cell_search_cuda(a, stream), "knn (cell search)");
}

// Queries with a K-th distance that is not below +inf answered again in the total order (knn.h).
void total_order(const Call& c, cudaStream_t stream) {
  check_launch(launch_total_order_cuda(c.queries.data_ptr<float>(), c.points.data_ptr<float>(),
                                       c.dist2.data_ptr<float>(), c.idx.data_ptr<int64_t>(), c.B, c.M, c.P,
                                       static_cast<int>(c.dist2.size(2)), stream),
               "knn (non-finite distances)");
}

void cell_search(const at::Tensor& queries, const at::Tensor& points, int64_t K, at::Tensor& dist2,
                 at::Tensor& idx, cudaStream_t stream) {
  const at::Tensor query_box = at::cat({queries.amin(1), queries.amax(1)}, 1);
  search_index(queries, points, K, build_index(points, query_box, K, stream), dist2, idx, stream);
}

std::vector<at::Tensor> knn_index_cuda(const at::Tensor& points_in, const at::Tensor& query_box, int64_t K) {
  check_index_inputs(points_in, query_box, K);
  check_grid_batch(points_in.size(0), "points");  // the list kernels' grid.y
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const Index x = build_index(points, query_box.to(at::kFloat).contiguous(), K, stream);
  return {x.geom, x.offset, x.cand, x.cell_bound, x.band_count, x.seeds};
}

std::tuple<at::Tensor, at::Tensor> knn_search_cuda(const at::Tensor& queries_in, const at::Tensor& points_in,
                                                   int64_t K, at::TensorList index) {
  check_inputs(queries_in, points_in, K);
  const int G = check_index(index, queries_in, points_in, K);
  const c10::cuda::CUDAGuard guard(queries_in.device());
  Call c = knn_call(queries_in, points_in, K);
  if (c.empty()) return {c.dist2, c.idx};
  Index x;
  x.geom = index[0];
  x.offset = index[1];
  x.cand = index[2];
  x.cell_bound = index[3];
  x.band_count = index[4];
  x.seeds = index[5];
  x.G = G;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  search_index(c.queries, c.points, K, x, c.dist2, c.idx, stream);
  total_order(c, stream);
  return {c.dist2, c.idx};
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries_in,
                                            const at::Tensor& points_in, int64_t K) {
  check_inputs(queries_in, points_in, K);
  check_grid_batch(queries_in.size(0), "queries");
  const c10::cuda::CUDAGuard guard(queries_in.device());
  Call c = knn_call(queries_in, points_in, K);
  const at::Tensor &queries = c.queries, &points = c.points;
  at::Tensor &dist2 = c.dist2, &idx = c.idx;
  const int64_t B = c.B, M = c.M, P = c.P;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  if (c.empty()) return {dist2, idx};
  const Method method = choose_method(M, P, kCellsMinQueries, Method::kBrute);
  if (method == Method::kCells) {
    cell_search(queries, points, K, dist2, idx, stream);
  } else if (method == Method::kGrid) {
    const GridTensors grid = build_grid(points);  // tensor ops on this stream
    check_launch(launch_knn_grid_cuda(grid.view, queries.data_ptr<float>(), dist2.data_ptr<float>(),
                                      idx.data_ptr<int64_t>(), B, M, static_cast<int>(K), stream),
                 "knn");
  } else {
    check_launch(launch_knn_cuda(queries.data_ptr<float>(), points.data_ptr<float>(), dist2.data_ptr<float>(),
                                 idx.data_ptr<int64_t>(), B, M, P, static_cast<int>(K), stream),
                 "knn");
  }
  total_order(c, stream);
  return {dist2, idx};
}

}  // namespace
}  // namespace knn
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) {
  m.impl("knn", &gpavatar::knn::knn_cuda);
  m.impl("knn_index", &gpavatar::knn::knn_index_cuda);
  m.impl("knn_search", &gpavatar::knn::knn_search_cuda);
}
