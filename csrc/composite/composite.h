// Alpha compositing along rays (SPEC section 8): the per-sample recurrences shared by
// the CPU and CUDA kernels.  No torch headers.
//
//   forward   alphas (R, S), values (R, S, C), depths (R, S)?
//             -> color (R, C), opacity (R), weights (R, S), depth (R)
//   backward  grad_color (R, C), grad_opacity (R), grad_weights (R, S), grad_depth (R)
//             -> grad_alphas (R, S), grad_values (R, S, C)
//
// Forward, front to back: w_i = alpha_i T_i, T_{i+1} = T_i (1 - alpha_i), T_0 = 1.
// Backward: with G_i = dL/dw_i (the weight's own gradient + <grad_color, v_i> +
// grad_depth t_i + grad_opacity), walking back to front with the
// suffix S_{S-1} = 0, S_{k-1} = alpha_k G_k + (1 - alpha_k) S_k:
// dL/dalpha_k = T_k (G_k - S_k) and dL/dv_k = w_k grad_color.  No division by 1 - alpha.
#pragma once

#include <cstdint>

#include "common.h"

namespace gpavatar {
namespace composite {

GPA_HD float next_transmittance(float T, float alpha) { return T * (1.f - alpha); }

// sum_i w_i = 1 - T_S lies in [0, 1]; the clamp only removes rounding, so its
// gradient is taken as the identity (torch.clamp's would depend on that rounding).
GPA_HD float clamp_opacity(float weight_sum) {
  return weight_sum < 0.f ? 0.f : (weight_sum > 1.f ? 1.f : weight_sum);
}

GPA_HD float grad_alpha(float T, float G, float suffix) { return T * (G - suffix); }

GPA_HD float previous_suffix(float alpha, float G, float suffix) {
  return alpha * G + (1.f - alpha) * suffix;
}

struct Args {
  const float* alphas;  // (R, S)
  const float* values;  // (R, S, C)
  const float* depths;  // (R, S) or null
  int64_t R, S, C;
};

struct Grads {
  const float* color;    // (R, C)
  const float* opacity;  // (R)
  const float* weights;  // (R, S)
  const float* depth;    // (R)
};

// CUDA launchers (composite.cu); they return a cudaError_t as int.
int launch_forward_cuda(const Args& a, float* color, float* opacity, float* weights, float* depth,
                        void* stream);
// transmittance: (R, S) scratch.
int launch_backward_cuda(const Args& a, const Grads& g, float* grad_alphas, float* grad_values,
                         float* transmittance, void* stream);

}  // namespace composite
}  // namespace gpavatar
