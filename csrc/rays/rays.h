// Ray sampling (SPEC sections 7 and 8): the per-ray arithmetic shared by the CPU and
// CUDA kernels.  No torch headers.  Products that feed a sum are rounded separately
// (mul_rn: no FMA contraction on the GPU) so both devices follow the reference's
// float32 evaluation order.
//
//   ray_box            origins (R, 3), dirs (R, 3)        -> t0 (R), t1 (R), hit (R)
//   stratified_depths  t0 (R), t1 (R), S, jitter (R, S+1)? -> depths (R, S)
//   importance_depths  depths (R, S), weights (R, S), n, offset (R)? -> (R, n)
//   merge_samples      a (R, Sa), b (R, Sb) sorted         -> depths (R, Sa+Sb), order (R, Sa+Sb)
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace gpavatar {
namespace rays {

constexpr float kMissDepth = -1.f;
constexpr float kPdfPadding = 1e-5f;
constexpr float kMinCdfStep = 1e-10f;

// Slab test.  inv = 1/d picks the entry plane by its sign bit (-0 is negative); NaN
// slab distances (origin on a slab plane, d = 0) impose nothing (fmax / fmin skip NaN);
// entry <= exit hits (touching counts) unless the exit is at t <= 0, or the entry or
// the exit is not finite: a zero direction (or one so small that 1/d overflows on every
// axis) or an infinite box has no finite entry / exit and counts as a miss.
GPA_HD bool ray_box(const float* o, const float* d, float lo, float hi, float* t0, float* t1) {
  float near = -INFINITY, far = INFINITY;
  for (int axis = 0; axis < 3; ++axis) {
    const float inv = 1.f / d[axis];
    const float t_lo = (lo - o[axis]) * inv, t_hi = (hi - o[axis]) * inv;
    const bool negative = std::signbit(inv);
    near = fmaxf(near, negative ? t_hi : t_lo);
    far = fminf(far, negative ? t_lo : t_hi);
  }
  const bool hit = near <= far && far > 0.f && near > -INFINITY && far < INFINITY;
  *t0 = hit ? near : kMissDepth;
  *t1 = hit ? far : kMissDepth;
  return hit;
}

// Edge k of S + 1 equally spaced edges: t0 + (t1 - t0) * (k / S).
GPA_HD float edge(float t0, float t1, int64_t k, int64_t S) {
  return t0 + mul_rn(t1 - t0, static_cast<float>(k) / static_cast<float>(S));
}

// Edge k after jitter u (uniform in [0, 1)): between the midpoints to its neighbours.
GPA_HD float jittered_edge(float t0, float t1, int64_t k, int64_t S, const float* u) {
  const float e = edge(t0, t1, k, S);
  if (u == nullptr) return e;
  const float lo = k == 0 ? e : (edge(t0, t1, k - 1, S) + e) * 0.5f;
  const float hi = k == S ? e : (e + edge(t0, t1, k + 1, S)) * 0.5f;
  return lo + mul_rn(hi - lo, u[k]);
}

// One ray's S depths (midpoints of consecutive edges); u: the ray's S + 1 uniforms or null.
GPA_HD void stratified(float t0, float t1, int64_t S, const float* u, float* out) {
  float previous = jittered_edge(t0, t1, 0, S, u);
  for (int64_t k = 0; k < S; ++k) {
    const float next = jittered_edge(t0, t1, k + 1, S, u);
    out[k] = (next + previous) * 0.5f;
    previous = next;
  }
}

// torch.maximum / torch.minimum: NaN if either argument is NaN (fmaxf / fminf would
// drop it; the reference's edges use torch's).
GPA_HD float maximum(float a, float b) { return a != a || b != b ? a + b : (a > b ? a : b); }
GPA_HD float minimum(float a, float b) { return a != a || b != b ? a + b : (a < b ? a : b); }

// One ray's n importance depths.  t, w: the ray's S coarse depths and weights; cdf:
// scratch of S floats; b: the target offset (0.5, or the ray's uniform in training).
GPA_HD void importance(const float* t, const float* w, int64_t S, int64_t n, float b, float* cdf,
                       float* out) {
  float total = 0.f;
  for (int64_t j = 0; j < S; ++j) total += w[j] + kPdfPadding;
  float running = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    running += (w[j] + kPdfPadding) / total;
    cdf[j] = running;
  }
  const float c0 = cdf[0];
  const float step = (cdf[S - 1] - c0) / static_cast<float>(n);
  int64_t p = 1;  // the first j in [0, S-2] with cdf_j > u (targets ascend); never 0
  for (int64_t i = 0; i < n; ++i) {
    const float u = c0 + mul_rn(static_cast<float>(i) + b, step);
    while (p < S - 1 && !(cdf[p] > u)) ++p;
    const float c_lo = cdf[p - 1], c_hi = cdf[p], t_lo = t[p - 1], t_hi = t[p];
    const float denom = c_hi - c_lo;
    out[i] = denom < kMinCdfStep ? (t_lo + t_hi) * 0.5f : t_lo + (u - c_lo) * (t_hi - t_lo) / denom;
  }
  // Edges around the samples (the outer ones bounded by the first / last coarse depth),
  // then their midpoints, in place.
  float s_prev = out[0];
  for (int64_t i = 0; i < n; ++i) {
    const float s = out[i];
    const float left = i == 0 ? maximum(s - mul_rn(out[1] - s, 0.5f), t[0]) : (s + s_prev) * 0.5f;
    const float right = i == n - 1 ? minimum(s + mul_rn(s - s_prev, 0.5f), t[S - 1])
                                   : (out[i + 1] + s) * 0.5f;
    out[i] = (right + left) * 0.5f;
    s_prev = s;
  }
}

// Whether x sorts strictly before y in torch.sort's order (NaN after every number,
// NaNs equal to each other).
GPA_HD bool sorts_before(float x, float y) { return x < y || (y != y && x == x); }

// Merge of two ascending arrays (in torch.sort's order: NaNs last); order indexes
// cat(a, b); ties take a first.
GPA_HD void merge(const float* a, int64_t Sa, const float* b, int64_t Sb, float* out,
                  int64_t* order) {
  int64_t i = 0, j = 0;
  for (int64_t k = 0; k < Sa + Sb; ++k) {
    const bool take_a = j >= Sb || (i < Sa && !sorts_before(b[j], a[i]));
    out[k] = take_a ? a[i] : b[j];
    order[k] = take_a ? i : Sa + j;
    if (take_a) ++i; else ++j;
  }
}

// CUDA launchers (rays.cu); they return a cudaError_t as int.
int launch_ray_box_cuda(int64_t R, const float* o, const float* d, float lo, float hi, float* t0,
                        float* t1, bool* hit, void* stream);
int launch_stratified_cuda(int64_t R, int64_t S, const float* t0, const float* t1, const float* u,
                           float* out, void* stream);
int launch_importance_cuda(int64_t R, int64_t S, int64_t n, const float* t, const float* w,
                           const float* offset, float* cdf, float* out, void* stream);
int launch_merge_cuda(int64_t R, int64_t Sa, int64_t Sb, const float* a, const float* b,
                      float* out, int64_t* order, void* stream);

}  // namespace rays
}  // namespace gpavatar
