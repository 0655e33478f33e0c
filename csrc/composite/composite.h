// Alpha compositing along rays (SPEC section 8): the per-sample recurrences shared by
// the CPU and CUDA kernels.  No torch headers.
//
//   forward   alphas (R, S), values (R, S, C), depths (R, S)?
//             -> color (R, C), opacity (R), weights (R, S), depth (R)
//   merged    the forward over two sample sets in the order of ops.merge_samples, read in
//             place (no merged copy of the alphas and values)
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
  const float* alphas;  // (R, S); merged form: set a's (R, Sa)
  const float* values;  // (R, S, C); merged form: set a's (R, Sa, C)
  const float* depths;  // (R, S) or null (in compositing order)
  int64_t R, S, C;
  // The merged form (composite_merged_forward, forward only): sample s of ray r is sample
  // order[r, s] of the ray's set a (alphas, values: indices < Sa) followed by its set b
  // (alphas_b, values_b: S - Sa samples), as ops.merge_samples orders two sample sets.
  const int64_t* order = nullptr;  // (R, S)
  const float* alphas_b = nullptr;  // (R, S - Sa)
  const float* values_b = nullptr;  // (R, S - Sa, C)
  int64_t Sa = 0;
};

// Where sample s of ray r is read from: its alpha and its row of C values.
struct Sample {
  const float* alpha;
  const float* value;
};

template <bool Merged>
GPA_HD Sample sample_at(const Args& a, int64_t r, int64_t s) {
  if constexpr (!Merged) {
    return {a.alphas + r * a.S + s, a.values + (r * a.S + s) * a.C};
  } else {
    int64_t i = a.order[r * a.S + s];
    i = i < 0 ? 0 : (i >= a.S ? a.S - 1 : i);  // unchecked input: a wrong sample, never a stray read
    if (i < a.Sa) return {a.alphas + r * a.Sa + i, a.values + (r * a.Sa + i) * a.C};
    const int64_t Sb = a.S - a.Sa, j = i - a.Sa;
    return {a.alphas_b + r * Sb + j, a.values_b + (r * Sb + j) * a.C};
  }
}

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
