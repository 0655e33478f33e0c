// Alpha compositing on CUDA tensors: checks, allocation, launches on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "composite/composite.h"
#include "cuda_check.h"
#include "ops.h"

namespace gpavatar {
namespace composite {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(const Args& a,
                                                                       const at::TensorOptions& options) {
  auto [color, opacity, weights, depth] = forward_outputs(a, options);
  check_launch(launch_forward_cuda(a, color.data_ptr<float>(), opacity.data_ptr<float>(),
                                   weights.data_ptr<float>(), depth.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream().stream()),
               "composite forward");
  return {color, opacity, weights, depth};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& alphas, const at::Tensor& values, const std::optional<at::Tensor>& depths) {
  const c10::cuda::CUDAGuard guard(alphas.device());
  check_inputs(alphas, values, depths);
  return run_forward(make_args(alphas, values, depths), alphas.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merged_forward_cuda(
    const at::Tensor& alphas_a, const at::Tensor& values_a, const at::Tensor& alphas_b, const at::Tensor& values_b,
    const at::Tensor& order, const std::optional<at::Tensor>& depths) {
  const c10::cuda::CUDAGuard guard(alphas_a.device());
  return run_forward(merged_args(alphas_a, values_a, alphas_b, values_b, order, depths), alphas_a.options());
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_color,
                                                 const at::Tensor& grad_opacity,
                                                 const at::Tensor& grad_weights,
                                                 const at::Tensor& grad_depth,
                                                 const at::Tensor& alphas,
                                                 const at::Tensor& values,
                                                 const std::optional<at::Tensor>& depths) {
  const c10::cuda::CUDAGuard guard(alphas.device());
  check_inputs(alphas, values, depths);
  check_grads(alphas, values, grad_color, grad_opacity, grad_weights, grad_depth);
  const Args a = make_args(alphas, values, depths);
  at::Tensor grad_alphas = at::empty_like(alphas);
  at::Tensor grad_values = at::empty_like(values);
  at::Tensor transmittance = at::empty_like(alphas);
  const Grads g{grad_color.data_ptr<float>(), grad_opacity.data_ptr<float>(),
                grad_weights.data_ptr<float>(), grad_depth.data_ptr<float>()};
  check_launch(launch_backward_cuda(a, g, grad_alphas.data_ptr<float>(),
                                    grad_values.data_ptr<float>(),
                                    transmittance.data_ptr<float>(),
                                    at::cuda::getCurrentCUDAStream().stream()),
               "composite backward");
  return {grad_alphas, grad_values};
}

}  // namespace
}  // namespace composite
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) {
  m.impl("composite_forward", &gpavatar::composite::forward_cuda);
  m.impl("composite_merged_forward", &gpavatar::composite::merged_forward_cuda);
  m.impl("composite_backward", &gpavatar::composite::backward_cuda);
}
