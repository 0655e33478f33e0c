// Alpha compositing on CUDA with the recurrences of composite.h.  A group of
// `lanes` threads serves one ray: lane l owns channels l*V, l*V + lanes*V, ...
// (V = 4 when C % 4 == 0 and the pointers are 16-byte aligned), so each sample's
// channel row is read by consecutive lanes; the scalar recurrences (T, w) are
// evaluated by every lane, and per-sample channel sums (<grad_color, v_i>) are
// reduced with shuffles.  The backward's back-to-front walk runs on lane 0.
#include <cuda_runtime.h>

#include "composite/composite.h"
#include "cuda_common.cuh"

namespace gpavatar {
namespace composite {
namespace {

template <int V, bool Merged>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(Args a, int lanes, float* __restrict__ color, float* __restrict__ opacity,
                   float* __restrict__ weights, float* __restrict__ depth) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = thread / lanes;
  if (r >= a.R) return;
  const int lane = static_cast<int>(thread % lanes);
  for (int64_t c = static_cast<int64_t>(lane) * V; c < a.C; c += static_cast<int64_t>(lanes) * V) {
    const bool first_chunk = c < static_cast<int64_t>(lanes) * V;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    float T = 1.f, weight_sum = 0.f, d = 0.f;
    for (int64_t s = 0; s < a.S; ++s) {
      const Sample x = sample_at<Merged>(a, r, s);
      const float al = __ldg(x.alpha);
      const float w = al * T;
      float v[V];
      load_floats<V>(x.value + c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * v[i];
      if (lane == 0 && first_chunk) {
        weights[r * a.S + s] = w;
        weight_sum += w;
        if (a.depths != nullptr) d += w * __ldg(a.depths + r * a.S + s);
      }
      T = next_transmittance(T, al);
    }
    store_floats<V>(color + r * a.C + c, acc);
    if (lane == 0 && first_chunk) {
      opacity[r] = clamp_opacity(weight_sum);
      depth[r] = d;
    }
  }
}

// Every thread of the grid runs to the end (the shuffles need full warps).
template <int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(Args a, Grads g, int lanes, float* __restrict__ grad_alphas,
                    float* __restrict__ grad_values, float* __restrict__ transmittance) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = thread / lanes < a.R;
  const int64_t r = active ? thread / lanes : 0;
  const int lane = static_cast<int>(thread % lanes);
  const int64_t S = a.S;  // inactive groups (past the last ray) read ray 0 and write nothing
  const float* alpha = a.alphas + r * a.S;
  float* G = grad_alphas + r * a.S;  // holds G_i until the walk overwrites it
  float T = 1.f, weight_sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float al = __ldg(alpha + s);
    const float w = al * T;
    float dot = 0.f;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < a.C;
         c += static_cast<int64_t>(lanes) * V) {
      float v[V], gc[V], gv[V];
      load_floats<V>(a.values + (r * a.S + s) * a.C + c, v);
      load_floats<V>(g.color + r * a.C + c, gc);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        dot += gc[i] * v[i];
        gv[i] = w * gc[i];
      }
      if (active) store_floats<V>(grad_values + (r * a.S + s) * a.C + c, gv);
    }
    dot = group_sum(dot, lanes);
    if (active && lane == 0) {
      float gs = __ldg(g.weights + r * a.S + s) + dot;
      if (a.depths != nullptr) gs += __ldg(g.depth + r) * __ldg(a.depths + r * a.S + s);
      G[s] = gs;
      transmittance[r * a.S + s] = T;
    }
    weight_sum += w;
    T = next_transmittance(T, al);
  }
  if (!active || lane != 0) return;
  const float g_opacity = g.opacity[r];
  float suffix = 0.f;
  for (int64_t k = a.S - 1; k >= 0; --k) {
    const float gk = G[k] + g_opacity;
    G[k] = grad_alpha(transmittance[r * a.S + k], gk, suffix);
    suffix = previous_suffix(alpha[k], gk, suffix);
  }
}

int vector_width(const Args& a, const void* p0, const void* p1) {
  return a.C % 4 == 0 && aligned16(a.values) && aligned16(a.values_b) && aligned16(p0) && aligned16(p1) ? 4 : 1;
}

template <bool Merged>
void launch_forward(const Args& a, float* color, float* opacity, float* weights, float* depth, cudaStream_t s) {
  const int V = vector_width(a, color, color);
  const int lanes = lanes_for(a.C, V);
  if (V == 4)
    forward_kernel<4, Merged><<<blocks_for(a.R * lanes), kThreadsPerBlock, 0, s>>>(a, lanes, color, opacity,
                                                                                   weights, depth);
  else
    forward_kernel<1, Merged><<<blocks_for(a.R * lanes), kThreadsPerBlock, 0, s>>>(a, lanes, color, opacity,
                                                                                   weights, depth);
}

}  // namespace

int launch_forward_cuda(const Args& a, float* color, float* opacity, float* weights, float* depth,
                        void* stream) {
  if (a.R == 0 || a.S == 0 || a.C == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.order != nullptr)
    launch_forward<true>(a, color, opacity, weights, depth, s);
  else
    launch_forward<false>(a, color, opacity, weights, depth, s);
  return static_cast<int>(cudaGetLastError());
}

int launch_backward_cuda(const Args& a, const Grads& g, float* grad_alphas, float* grad_values,
                         float* transmittance, void* stream) {
  if (a.R == 0 || a.S == 0) return 0;
  const int V = vector_width(a, g.color, grad_values);
  const int lanes = lanes_for(a.C, V);
  auto s = static_cast<cudaStream_t>(stream);
  if (V == 4)
    backward_kernel<4><<<blocks_for(a.R * lanes), kThreadsPerBlock, 0, s>>>(
        a, g, lanes, grad_alphas, grad_values, transmittance);
  else
    backward_kernel<1><<<blocks_for(a.R * lanes), kThreadsPerBlock, 0, s>>>(
        a, g, lanes, grad_alphas, grad_values, transmittance);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace composite
}  // namespace gpavatar
