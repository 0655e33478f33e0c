// Tri-plane sampling on CUDA tensors: checks, allocation, launches on the
// current stream.  The deterministic plane gradient sorts the (b, t, m) samples
// by texel cell with a stable sort and hands the order to the gather kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_check.h"
#include "ops.h"
#include "triplane/triplane.h"

namespace gpavatar {
namespace triplane {
namespace {

// The forward's (B, M, out_row) output on the current stream; `extra` is the (B, M, E) tensor of
// a.extra, or undefined.  C = 0: the launcher samples nothing and the extra features are the row.
at::Tensor run_forward(const Args& a, const at::Tensor& coords, const at::Tensor& extra, const char* what) {
  at::Tensor out = at::empty({a.B, a.M, out_row(a)}, coords.options());
  if (a.C == 0) {
    if (a.E > 0) out.copy_(extra);
    return out;
  }
  check_launch(launch_forward_cuda(a, out.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()), what);
  return out;
}

at::Tensor forward_cuda(const at::Tensor& planes, const at::Tensor& coords, bool concat,
                        bool /*deterministic*/) {
  const c10::cuda::CUDAGuard guard(planes.device());
  return run_forward(check_inputs(planes, coords, concat), coords, at::Tensor(), "triplane_sample forward");
}

// [the mean tri-plane features, extra] per row: the forward with the extra features copied in.
at::Tensor forward_extra_cuda(const at::Tensor& planes, const at::Tensor& coords, const at::Tensor& extra) {
  const c10::cuda::CUDAGuard guard(planes.device());
  Args a = check_inputs(planes, coords, /*concat=*/false);
  check_extra(a, extra, planes);
  return run_forward(a, coords, extra, "triplane_sample forward (extra)");
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out,
                                                 const at::Tensor& planes,
                                                 const at::Tensor& coords, bool concat,
                                                 bool deterministic, bool planes_grad,
                                                 bool coords_grad) {
  const c10::cuda::CUDAGuard guard(planes.device());
  const Args a = check_inputs(planes, coords, concat);
  check_grad_out(a, grad_out, planes);
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const float* g = grad_out.data_ptr<float>();
  at::Tensor grad_coords = !coords_grad ? coords.new_empty({0})
                           : (a.C == 0 ? at::zeros_like(coords) : at::empty_like(coords));
  at::Tensor grad_planes = planes.new_empty({0});
  at::Tensor buffer;
  if (planes_grad) {
    const auto f32 = planes.options().dtype(at::kFloat);
    buffer = deterministic ? at::empty(planes.sizes(), f32) : at::zeros(planes.sizes(), f32);
  }
  const bool atomics = planes_grad && !deterministic;
  if (coords_grad || atomics) {
    check_launch(launch_backward_cuda(a, g, atomics ? buffer.data_ptr<float>() : nullptr,
                                      coords_grad ? grad_coords.data_ptr<float>() : nullptr,
                                      stream),
                 "triplane_sample backward");
  }
  if (planes_grad && deterministic) {
    const int64_t cells = a.B * 3 * (a.H + 1) * (a.W + 1);
    at::Tensor keys = at::empty({a.B * 3 * a.M}, coords.options().dtype(at::kLong));
    check_launch(launch_cell_keys_cuda(a, keys.data_ptr<int64_t>(), stream),
                 "triplane_sample cell keys");
    auto [sorted, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor bounds = at::arange(cells + 1, keys.options());
    const at::Tensor cell_start = at::searchsorted(sorted, bounds);
    check_launch(launch_gather_planes_cuda(a, g, order.data_ptr<int64_t>(),
                                           cell_start.data_ptr<int64_t>(),
                                           buffer.data_ptr<float>(), stream),
                 "triplane_sample deterministic backward");
  }
  if (planes_grad)
    grad_planes = planes.scalar_type() == at::kFloat ? buffer : buffer.to(planes.scalar_type());
  return {grad_planes, grad_coords};
}

}  // namespace
}  // namespace triplane
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CUDA, m) {
  m.impl("triplane_sample_forward", &gpavatar::triplane::forward_cuda);
  m.impl("triplane_sample_forward_extra", &gpavatar::triplane::forward_extra_cuda);
  m.impl("triplane_sample_backward", &gpavatar::triplane::backward_cuda);
}
