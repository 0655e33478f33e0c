// knn on CUDA tensors: input checks, allocation and the launch on the current
// stream (the kernel itself is in knn.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "knn/knn.h"
#include "cuda_check.h"
#include "ops.h"

namespace gpavatar {
namespace knn {
namespace {

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries_in,
                                            const at::Tensor& points_in, int64_t K) {
  check_inputs(queries_in, points_in, K);
  TORCH_CHECK_VALUE(queries_in.size(0) <= 65535, msg("queries: batch size B must be <= 65535, got ",
                    queries_in.size(0)));
  const c10::cuda::CUDAGuard guard(queries_in.device());
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor points = points_in.contiguous();
  const int64_t B = queries.size(0), M = queries.size(1), P = points.size(1);
  at::Tensor dist2 = at::empty({B, M, K}, queries.options());
  at::Tensor idx = at::empty({B, M, K}, queries.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  int err;
  if (use_grid(P)) {
    const GridTensors grid = build_grid(points);  // tensor ops on this stream
    err = launch_knn_grid_cuda(grid.view, queries.data_ptr<float>(), dist2.data_ptr<float>(),
                               idx.data_ptr<int64_t>(), B, M, static_cast<int>(K), stream);
  } else {
    err = launch_knn_cuda(queries.data_ptr<float>(), points.data_ptr<float>(),
                          dist2.data_ptr<float>(), idx.data_ptr<int64_t>(), B, M, P,
                          static_cast<int>(K), stream);
  }
  check_launch(err, "knn");
  return {dist2, idx};
}

}  // namespace
}  // namespace knn
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) { m.impl("knn", &gpavatar::knn::knn_cuda); }
