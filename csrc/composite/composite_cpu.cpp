// Alpha compositing on the CPU (and the checks every device shares): one ray at a
// time, parallel over rays, with the recurrences of composite.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "composite/composite.h"
#include "ops.h"

namespace gpavatar {
namespace composite {

void check_inputs(const at::Tensor& alphas, const at::Tensor& values,
                  const std::optional<at::Tensor>& depths) {
  check_contiguous_float(alphas, "alphas", 2, "(R, S)");
  check_contiguous_float(values, "values", 3, "(R, S, C)");
  TORCH_CHECK_VALUE(values.size(0) == alphas.size(0) && values.size(1) == alphas.size(1), msg("values must have shape (", alphas.size(0), ", ", alphas.size(1), ", C), got ",
                    shape_of(values)));
  TORCH_CHECK_VALUE(values.size(2) >= 1, msg("values must have C >= 1 channels, got ", shape_of(values)));
  check_same_device(alphas, "alphas", values, "values");
  if (depths.has_value()) {
    check_contiguous_float(*depths, "depths", 2, "(R, S)");
    TORCH_CHECK_VALUE(depths->sizes() == alphas.sizes(), msg("depths must have shape ", shape_of(alphas),
                      ", got ", shape_of(*depths)));
    check_same_device(alphas, "alphas", *depths, "depths");
  }
}

void check_grads(const at::Tensor& alphas, const at::Tensor& values, const at::Tensor& grad_color,
                 const at::Tensor& grad_opacity, const at::Tensor& grad_weights,
                 const at::Tensor& grad_depth) {
  const int64_t R = alphas.size(0), C = values.size(2);
  check_contiguous_float(grad_color, "grad_color", 2, "(R, C)");
  check_contiguous_float(grad_opacity, "grad_opacity", 1, "(R,)");
  check_contiguous_float(grad_weights, "grad_weights", 2, "(R, S)");
  check_contiguous_float(grad_depth, "grad_depth", 1, "(R,)");
  TORCH_CHECK_VALUE(grad_color.size(0) == R && grad_color.size(1) == C, msg("grad_color must have shape (", R, ", ", C, "), got ", shape_of(grad_color)));
  TORCH_CHECK_VALUE(grad_opacity.size(0) == R, msg("grad_opacity must have shape (", R, ",), got ",
                    shape_of(grad_opacity)));
  TORCH_CHECK_VALUE(grad_weights.sizes() == alphas.sizes(), msg("grad_weights must have shape ",
                    shape_of(alphas), ", got ", shape_of(grad_weights)));
  TORCH_CHECK_VALUE(grad_depth.size(0) == R, msg("grad_depth must have shape (", R, ",), got ",
                    shape_of(grad_depth)));
  const at::Tensor* grads[] = {&grad_color, &grad_opacity, &grad_weights, &grad_depth};
  const char* names[] = {"grad_color", "grad_opacity", "grad_weights", "grad_depth"};
  for (int i = 0; i < 4; ++i) check_same_device(alphas, "alphas", *grads[i], names[i]);
}

Args make_args(const at::Tensor& alphas, const at::Tensor& values,
               const std::optional<at::Tensor>& depths) {
  return {alphas.data_ptr<float>(), values.data_ptr<float>(),
          depths.has_value() ? depths->data_ptr<float>() : nullptr, alphas.size(0), alphas.size(1),
          values.size(2)};
}

Args merged_args(const at::Tensor& alphas_a, const at::Tensor& values_a, const at::Tensor& alphas_b,
                 const at::Tensor& values_b, const at::Tensor& order, const std::optional<at::Tensor>& depths) {
  check_contiguous_float(alphas_a, "alphas_a", 2, "(R, Sa)");
  check_contiguous_float(alphas_b, "alphas_b", 2, "(R, Sb)");
  check_contiguous_float(values_a, "values_a", 3, "(R, Sa, C)");
  check_contiguous_float(values_b, "values_b", 3, "(R, Sb, C)");
  const int64_t R = alphas_a.size(0), Sa = alphas_a.size(1), Sb = alphas_b.size(1), C = values_a.size(2);
  TORCH_CHECK_VALUE(alphas_b.size(0) == R, msg("alphas_b must have shape (", R, ", Sb), got ", shape_of(alphas_b)));
  TORCH_CHECK_VALUE(values_a.size(0) == R && values_a.size(1) == Sa && C >= 1,
                    msg("values_a must have shape (", R, ", ", Sa, ", C) with C >= 1, got ", shape_of(values_a)));
  TORCH_CHECK_VALUE(values_b.size(0) == R && values_b.size(1) == Sb && values_b.size(2) == C,
                    msg("values_b must have shape (", R, ", ", Sb, ", ", C, "), got ", shape_of(values_b)));
  TORCH_CHECK_VALUE(order.scalar_type() == at::kLong && order.dim() == 2 && order.size(0) == R &&
                        order.size(1) == Sa + Sb && order.is_contiguous(),
                    msg("order must be a contiguous int64 tensor of shape (", R, ", ", Sa + Sb, "), got ",
                        order.scalar_type(), " ", shape_of(order)));
  check_same_device(alphas_a, "alphas_a", values_a, "values_a");
  check_same_device(alphas_a, "alphas_a", alphas_b, "alphas_b");
  check_same_device(alphas_a, "alphas_a", values_b, "values_b");
  check_same_device(alphas_a, "alphas_a", order, "order");
  if (depths.has_value()) {
    check_contiguous_float(*depths, "depths", 2, "(R, Sa + Sb)");
    TORCH_CHECK_VALUE(depths->sizes() == order.sizes(), msg("depths must have shape ", shape_of(order), ", got ",
                      shape_of(*depths)));
    check_same_device(alphas_a, "alphas_a", *depths, "depths");
  }
  Args a{alphas_a.data_ptr<float>(), values_a.data_ptr<float>(),
         depths.has_value() ? depths->data_ptr<float>() : nullptr, R, Sa + Sb, C};
  a.order = order.data_ptr<int64_t>();
  a.alphas_b = alphas_b.data_ptr<float>();
  a.values_b = values_b.data_ptr<float>();
  a.Sa = Sa;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(const Args& a,
                                                                           const at::TensorOptions& options) {
  return {at::zeros({a.R, a.C}, options), at::zeros({a.R}, options), at::empty({a.R, a.S}, options),
          at::zeros({a.R}, options)};
}

namespace {

int64_t grain(const Args& a) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.S * a.C)); }

template <bool Merged>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(const Args& a,
                                                                       const at::TensorOptions& options) {
  auto [color, opacity, weights, depth] = forward_outputs(a, options);
  float *col = color.data_ptr<float>(), *op = opacity.data_ptr<float>();
  float *wts = weights.data_ptr<float>(), *dep = depth.data_ptr<float>();
  at::parallel_for(0, a.R, grain(a), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* c = col + r * a.C;
      float T = 1.f, weight_sum = 0.f, d = 0.f;
      for (int64_t i = 0; i < a.S; ++i) {
        const Sample x = sample_at<Merged>(a, r, i);
        const float w = *x.alpha * T;
        wts[r * a.S + i] = w;
        for (int64_t ch = 0; ch < a.C; ++ch) c[ch] += w * x.value[ch];
        weight_sum += w;
        if (a.depths != nullptr) d += w * a.depths[r * a.S + i];
        T = next_transmittance(T, *x.alpha);
      }
      op[r] = clamp_opacity(weight_sum);
      dep[r] = d;
    }
  });
  return {color, opacity, weights, depth};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& alphas, const at::Tensor& values, const std::optional<at::Tensor>& depths) {
  check_inputs(alphas, values, depths);
  return run_forward<false>(make_args(alphas, values, depths), alphas.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merged_forward_cpu(
    const at::Tensor& alphas_a, const at::Tensor& values_a, const at::Tensor& alphas_b, const at::Tensor& values_b,
    const at::Tensor& order, const std::optional<at::Tensor>& depths) {
  return run_forward<true>(merged_args(alphas_a, values_a, alphas_b, values_b, order, depths), alphas_a.options());
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_color,
                                                const at::Tensor& grad_opacity,
                                                const at::Tensor& grad_weights,
                                                const at::Tensor& grad_depth,
                                                const at::Tensor& alphas, const at::Tensor& values,
                                                const std::optional<at::Tensor>& depths) {
  check_inputs(alphas, values, depths);
  check_grads(alphas, values, grad_color, grad_opacity, grad_weights, grad_depth);
  const Args a = make_args(alphas, values, depths);
  at::Tensor grad_alphas = at::empty_like(alphas);
  at::Tensor grad_values = at::empty_like(values);
  const float *gc = grad_color.data_ptr<float>(), *go = grad_opacity.data_ptr<float>();
  const float *gw = grad_weights.data_ptr<float>(), *gd = grad_depth.data_ptr<float>();
  float *ga = grad_alphas.data_ptr<float>(), *gv = grad_values.data_ptr<float>();
  at::parallel_for(0, a.R, grain(a), [&](int64_t begin, int64_t end) {
    std::vector<float> transmittance(a.S);
    for (int64_t r = begin; r < end; ++r) {
      const float* alpha = a.alphas + r * a.S;
      const float* g_color = gc + r * a.C;
      float* G = ga + r * a.S;  // holds G_i until the backward walk overwrites it
      float T = 1.f, weight_sum = 0.f;
      for (int64_t i = 0; i < a.S; ++i) {
        const float w = alpha[i] * T;
        const float* v = a.values + (r * a.S + i) * a.C;
        float* g_value = gv + (r * a.S + i) * a.C;
        float dot = 0.f;
        for (int64_t ch = 0; ch < a.C; ++ch) {
          dot += g_color[ch] * v[ch];
          g_value[ch] = w * g_color[ch];
        }
        float g = gw[r * a.S + i] + dot;
        if (a.depths != nullptr) g += gd[r] * a.depths[r * a.S + i];
        G[i] = g;
        transmittance[i] = T;
        weight_sum += w;
        T = next_transmittance(T, alpha[i]);
      }
      const float g_opacity = go[r];
      float suffix = 0.f;
      for (int64_t k = a.S - 1; k >= 0; --k) {
        const float g = G[k] + g_opacity;
        G[k] = grad_alpha(transmittance[k], g, suffix);
        suffix = previous_suffix(alpha[k], g, suffix);
      }
    }
  });
  return {grad_alphas, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) {
  m.impl("composite_forward", &forward_cpu);
  m.impl("composite_merged_forward", &merged_forward_cpu);
  m.impl("composite_backward", &backward_cpu);
}

}  // namespace composite
}  // namespace gpavatar
