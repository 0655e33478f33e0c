// Ray sampling on CUDA tensors: checks, allocation, launches on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_check.h"
#include "ops.h"
#include "rays/rays.h"

namespace gpavatar {
namespace rays {
namespace {

void* stream() { return at::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> ray_box_cuda(const at::Tensor& origins,
                                                            const at::Tensor& dirs, double lo,
                                                            double hi) {
  const c10::cuda::CUDAGuard guard(origins.device());
  check_ray_box(origins, dirs, lo, hi);
  const int64_t R = origins.size(0);
  at::Tensor t0 = at::empty({R}, origins.options()), t1 = at::empty({R}, origins.options());
  at::Tensor hit = at::empty({R}, origins.options().dtype(at::kBool));
  check_launch(launch_ray_box_cuda(R, origins.data_ptr<float>(), dirs.data_ptr<float>(),
                                   static_cast<float>(lo), static_cast<float>(hi),
                                   t0.data_ptr<float>(), t1.data_ptr<float>(),
                                   hit.data_ptr<bool>(), stream()),
               "ray_box");
  return {t0, t1, hit};
}

at::Tensor stratified_cuda(const at::Tensor& t0, const at::Tensor& t1, int64_t S,
                           const std::optional<at::Tensor>& u) {
  const c10::cuda::CUDAGuard guard(t0.device());
  check_stratified(t0, t1, S, u);
  at::Tensor out = at::empty({t0.size(0), S}, t0.options());
  check_launch(launch_stratified_cuda(t0.size(0), S, t0.data_ptr<float>(), t1.data_ptr<float>(),
                                      u.has_value() ? u->data_ptr<float>() : nullptr,
                                      out.data_ptr<float>(), stream()),
               "stratified_depths");
  return out;
}

at::Tensor importance_cuda(const at::Tensor& t, const at::Tensor& w, int64_t n,
                           const std::optional<at::Tensor>& offset) {
  const c10::cuda::CUDAGuard guard(t.device());
  check_importance(t, w, n, offset);
  const int64_t R = t.size(0), S = t.size(1);
  at::Tensor out = at::empty({R, n}, t.options());
  at::Tensor cdf = at::empty({R, S}, t.options());
  check_launch(launch_importance_cuda(R, S, n, t.data_ptr<float>(), w.data_ptr<float>(),
                                      offset.has_value() ? offset->data_ptr<float>() : nullptr,
                                      cdf.data_ptr<float>(), out.data_ptr<float>(), stream()),
               "importance_depths");
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_cuda(const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(a.device());
  check_merge(a, b);
  const int64_t R = a.size(0), S = a.size(1) + b.size(1);
  at::Tensor out = at::empty({R, S}, a.options());
  at::Tensor order = at::empty({R, S}, a.options().dtype(at::kLong));
  check_launch(launch_merge_cuda(R, a.size(1), b.size(1), a.data_ptr<float>(), b.data_ptr<float>(),
                                 out.data_ptr<float>(), order.data_ptr<int64_t>(), stream()),
               "merge_samples");
  return {out, order};
}

}  // namespace
}  // namespace rays
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) {
  m.impl("ray_box", &gpavatar::rays::ray_box_cuda);
  m.impl("stratified_depths", &gpavatar::rays::stratified_cuda);
  m.impl("importance_depths", &gpavatar::rays::importance_cuda);
  m.impl("merge_samples", &gpavatar::rays::merge_cuda);
}
