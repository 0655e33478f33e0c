// knn_blend on CUDA tensors: checks, allocation, launches on the current
// stream.  The backward runs the per-query kernel over chunks of queries and
// reduces its per-neighbour outputs with index_add_ and matrix products, so
// the extra memory is bounded by the chunk size, not by M.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "knn_blend/knn_blend.h"
#include "knn_blend/knn_blend_tiles.h"
#include "cuda_check.h"
#include "ops.h"

namespace gpavatar {
namespace knn_blend {
namespace {

constexpr int64_t kMaxHidden = 128;
constexpr int64_t kMaxOut = 64;
constexpr int64_t kChunkFloats = int64_t(1) << 26;  // 256 MiB of per-neighbour buffers

// Floats of backward buffers per chunk; GPAVATAR_BLEND_CHUNK_FLOATS overrides it
// (tests use a tiny value to exercise the chunk loop).
int64_t chunk_floats() {
  const char* env = std::getenv("GPAVATAR_BLEND_CHUNK_FLOATS");
  const int64_t value = env != nullptr ? std::atoll(env) : 0;
  return value > 0 ? value : kChunkFloats;
}

// The shared checks and views, plus the limits of the CUDA kernels.
Prepared prepare_cuda(const at::Tensor& queries, const at::Tensor& points, const at::Tensor& dist2,
                      const at::Tensor& idx, const at::Tensor& table, const at::Tensor& w1_dir,
                      const at::Tensor& w2, const at::Tensor& b2,
                      const std::optional<at::Tensor>& weight_sum, double eps) {
  Prepared p = prepare(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps);
  TORCH_CHECK_VALUE(p.args.H <= kMaxHidden && p.args.C <= kMaxOut, msg("the CUDA knn_blend supports hidden size H <= ", kMaxHidden,
                    " and output size C <= ", kMaxOut, ", got H = ", p.args.H, ", C = ", p.args.C,
                    " (use backend='triton' or 'torch')"));
  check_grid_batch(p.args.B, "queries");
  const std::string variant =
      env_choice("GPAVATAR_BLEND_CUDA_VARIANT", {"default", "occupancy", "generic"}, "default");
  p.args.cuda_variant = variant == "occupancy" ? kVariantOccupancy
                        : variant == "generic"  ? kVariantGeneric
                                                : kVariantDefault;
  return p;
}

// The tiled kernels read table rows 16 bytes at a time: a table that does not start on a
// 16-byte boundary (a view into a larger tensor) is copied first.
void align_table(Prepared& p) {
  if (reinterpret_cast<uintptr_t>(p.args.table) % 16 == 0) return;
  p.table = p.table.clone();
  p.args.table = p.table.data_ptr<float>();
}

at::Tensor forward_cuda(const at::Tensor& queries, const at::Tensor& points,
                        const at::Tensor& dist2, const at::Tensor& idx, const at::Tensor& table,
                        const at::Tensor& w1_dir, const at::Tensor& w2, const at::Tensor& b2,
                        const std::optional<at::Tensor>& weight_sum, double eps) {
  const c10::cuda::CUDAGuard guard(queries.device());
  Prepared p = prepare_cuda(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps);
  at::Tensor out = at::empty({p.args.B, p.args.M, p.args.C}, queries.options());
  const ForwardMethod method = blend_forward_method(true);
  if (method != ForwardMethod::kQueries && tiles_forward_supported(p.args)) {
    align_table(p);
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    if (method == ForwardMethod::kTilesTf32) {
      TORCH_CHECK_VALUE(props->major >= 8, msg("GPAVATAR_BLEND_FORWARD=tiles_tf32 needs a GPU of compute capability 8.0 "
                                               "or more, got ", props->major, ".", props->minor));
      check_launch(launch_knn_blend_tiles_forward_tc_cuda(p.args, props->multiProcessorCount, out.data_ptr<float>(),
                                                          at::cuda::getCurrentCUDAStream().stream()),
                   "knn_blend forward (tiles, tf32)");
      return out;
    }
    check_launch(launch_knn_blend_tiles_forward_cuda(p.args, props->multiProcessorCount, out.data_ptr<float>(),
                                                     at::cuda::getCurrentCUDAStream().stream()),
                 "knn_blend forward (tiles)");
    return out;
  }
  check_launch(launch_knn_blend_forward_cuda(p.args, out.data_ptr<float>(),
                                             at::cuda::getCurrentCUDAStream().stream()),
               "knn_blend forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& queries, const at::Tensor& points,
    const at::Tensor& dist2, const at::Tensor& idx, const at::Tensor& table,
    const at::Tensor& w1_dir, const at::Tensor& w2, const std::optional<at::Tensor>& weight_sum,
    double eps) {
  const c10::cuda::CUDAGuard guard(queries.device());
  Prepared p = prepare_cuda(queries, points, dist2, idx, table, w1_dir, w2, at::Tensor(), weight_sum, eps);
  check_grad_out(grad_out, p);
  const BackwardMethod method = blend_backward_method(true);
  if (method == BackwardMethod::kTiles) align_table(p);
  const BlendArgs& a = p.args;
  const at::Tensor go = grad_out.contiguous();
  auto opts = queries.options();
  if (method == BackwardMethod::kTiles && tiles_supported(a) && a.B * a.M > 0) {
    // One pass, nothing per neighbour stored: grad_table by atomics, grad_w1 in block shares.
    auto stream = at::cuda::getCurrentCUDAStream().stream();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    at::Tensor grad_table = at::zeros({table.size(0), a.H}, opts);
    at::Tensor hidden = at::empty({a.B * a.M, a.H}, opts);
    at::Tensor total = at::empty({a.B * a.M}, opts);
    at::Tensor part_w1 = at::empty({2 * tile_blocks(tile_count(a), sms), kEmbedDim, a.H}, opts);
    check_launch(launch_knn_blend_tiles_backward_cuda(a, go.data_ptr<float>(), sms, hidden.data_ptr<float>(),
                                                      total.data_ptr<float>(), grad_table.data_ptr<float>(),
                                                      part_w1.data_ptr<float>(), stream),
                 "knn_blend backward (tiles)");
    const at::Tensor go2 = go.reshape({a.B * a.M, a.C});
    return {grad_table, part_w1.sum(0).t().contiguous(), at::mm(go2.t(), hidden), at::mv(go2.t(), total)};
  }
  if (method == BackwardMethod::kGather && a.B * a.M > 0) {
    // Pairs grouped by table row, chunk sums, no per-pair buffers, no atomics (knn_blend.h).
    auto stream = at::cuda::getCurrentCUDAStream().stream();
    const GatherPlan plan = make_gather_plan(p, go);
    at::Tensor part_table = at::empty({std::max<int64_t>(plan.max_chunks, 1), a.H}, opts);
    at::Tensor part_w1 = at::empty({gather_blocks(plan.max_chunks), kEmbedDim, a.H}, opts);
    check_launch(launch_knn_blend_gather_cuda(a, plan.v.data_ptr<float>(), plan.perm.data_ptr<int64_t>(),
                                              plan.row_start.data_ptr<int64_t>(),
                                              plan.chunk_start.data_ptr<int64_t>(), plan.rows,
                                              plan.max_chunks, part_table.data_ptr<float>(),
                                              part_w1.data_ptr<float>(), stream),
                 "knn_blend backward (gather)");
    at::Tensor grad_table = at::empty({plan.rows, a.H}, opts);
    check_launch(launch_knn_blend_gather_reduce_cuda(plan.chunk_start.data_ptr<int64_t>(), plan.rows, a.H,
                                                     part_table.data_ptr<float>(),
                                                     grad_table.data_ptr<float>(), stream),
                 "knn_blend backward (gather)");
    at::Tensor hidden = at::empty({a.B * a.M, a.H}, opts);
    at::Tensor total = at::empty({a.B * a.M}, opts);
    check_launch(launch_knn_blend_hidden_cuda(a, hidden.data_ptr<float>(), total.data_ptr<float>(), stream),
                 "knn_blend backward (gather)");
    const at::Tensor go2 = go.reshape({a.B * a.M, a.C});
    return {grad_table, part_w1.sum(0).t().contiguous(), at::mm(go2.t(), hidden), at::mv(go2.t(), total)};
  }
  at::Tensor grad_table = at::zeros({table.size(0), a.H}, opts);
  at::Tensor grad_w1t = at::zeros({kEmbedDim, a.H}, opts);
  at::Tensor grad_w2 = at::zeros({a.C, a.H}, opts);
  at::Tensor grad_b2 = at::zeros({a.C}, opts);
  if (a.B == 0 || a.M == 0)
    return {grad_table, grad_w1t.t().contiguous(), grad_w2, grad_b2};

  const int64_t per_query = a.B * (a.K * (a.H + kEmbedDim) + a.H + 1);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(a.M, chunk_floats() / per_query));
  // Flat buffers: the kernel packs a chunk of n queries as (B, n, ...), so each
  // chunk views the first B * n rows.
  at::Tensor hidden = at::empty({a.B * chunk * a.H}, opts);
  at::Tensor total = at::empty({a.B * chunk}, opts);
  at::Tensor delta = at::empty({a.B * chunk * a.K * a.H}, opts);
  at::Tensor gamma = at::empty({a.B * chunk * a.K * kEmbedDim}, opts);
  const at::Tensor batch_offset =
      a.per_batch_table ? at::arange(a.B, p.idx.options()).mul_(a.P).view({a.B, 1, 1})
                        : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  for (int64_t m0 = 0; m0 < a.M; m0 += chunk) {
    const int64_t m1 = std::min(a.M, m0 + chunk), n = m1 - m0, rows_in_chunk = a.B * n;
    check_launch(launch_knn_blend_backward_cuda(
                     a, go.data_ptr<float>(), m0, m1, hidden.data_ptr<float>(),
                     total.data_ptr<float>(), delta.data_ptr<float>(), gamma.data_ptr<float>(),
                     stream),
                 "knn_blend backward");
    const at::Tensor h = hidden.narrow(0, 0, rows_in_chunk * a.H).view({rows_in_chunk, a.H});
    const at::Tensor t = total.narrow(0, 0, rows_in_chunk);
    const at::Tensor d =
        delta.narrow(0, 0, rows_in_chunk * a.K * a.H).view({rows_in_chunk * a.K, a.H});
    const at::Tensor ge = gamma.narrow(0, 0, rows_in_chunk * a.K * kEmbedDim)
                              .view({rows_in_chunk * a.K, kEmbedDim});
    const at::Tensor g = go.narrow(1, m0, n).reshape({rows_in_chunk, a.C});
    at::Tensor rows = p.idx.narrow(1, m0, n);
    if (a.per_batch_table) rows = rows + batch_offset;
    // Out-of-range indices contributed zero rows; clamp them so index_add_ stays in bounds.
    rows = rows.clamp(0, table.size(0) - 1).reshape({-1});
    grad_table.index_add_(0, rows, d);
    grad_w1t.addmm_(ge.t(), d);
    grad_w2.addmm_(g.t(), h);
    grad_b2.add_((g * t.unsqueeze(1)).sum(0));
  }
  return {grad_table, grad_w1t.t().contiguous(), grad_w2, grad_b2};
}

}  // namespace
}  // namespace knn_blend
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) {
  m.impl("knn_blend_forward", &gpavatar::knn_blend::forward_cuda);
  m.impl("knn_blend_backward", &gpavatar::knn_blend::backward_cuda);
}
