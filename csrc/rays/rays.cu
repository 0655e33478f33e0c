// Ray sampling on CUDA: one thread per ray, with the per-ray arithmetic of rays.h.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "rays/rays.h"

namespace gpavatar {
namespace rays {
namespace {

__device__ __forceinline__ int64_t ray_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__global__ void ray_box_kernel(int64_t R, const float* o, const float* d, float lo, float hi,
                               float* t0, float* t1, bool* hit) {
  const int64_t r = ray_index();
  if (r < R) hit[r] = ray_box(o + 3 * r, d + 3 * r, lo, hi, t0 + r, t1 + r);
}

__global__ void stratified_kernel(int64_t R, int64_t S, const float* t0, const float* t1,
                                  const float* u, float* out) {
  const int64_t r = ray_index();
  if (r < R) stratified(t0[r], t1[r], S, u != nullptr ? u + r * (S + 1) : nullptr, out + r * S);
}

__global__ void importance_kernel(int64_t R, int64_t S, int64_t n, const float* t, const float* w,
                                  const float* offset, float* cdf, float* out) {
  const int64_t r = ray_index();
  if (r < R)
    importance(t + r * S, w + r * S, S, n, offset != nullptr ? offset[r] : 0.5f, cdf + r * S,
               out + r * n);
}

__global__ void merge_kernel(int64_t R, int64_t Sa, int64_t Sb, const float* a, const float* b,
                             float* out, int64_t* order) {
  const int64_t r = ray_index();
  if (r < R) merge(a + r * Sa, Sa, b + r * Sb, Sb, out + r * (Sa + Sb), order + r * (Sa + Sb));
}

int status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

int launch_ray_box_cuda(int64_t R, const float* o, const float* d, float lo, float hi, float* t0,
                        float* t1, bool* hit, void* stream) {
  if (R == 0) return 0;
  ray_box_kernel<<<blocks_for(R), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      R, o, d, lo, hi, t0, t1, hit);
  return status();
}

int launch_stratified_cuda(int64_t R, int64_t S, const float* t0, const float* t1, const float* u,
                           float* out, void* stream) {
  if (R == 0) return 0;
  stratified_kernel<<<blocks_for(R), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      R, S, t0, t1, u, out);
  return status();
}

int launch_importance_cuda(int64_t R, int64_t S, int64_t n, const float* t, const float* w,
                           const float* offset, float* cdf, float* out, void* stream) {
  if (R == 0) return 0;
  importance_kernel<<<blocks_for(R), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      R, S, n, t, w, offset, cdf, out);
  return status();
}

int launch_merge_cuda(int64_t R, int64_t Sa, int64_t Sb, const float* a, const float* b,
                      float* out, int64_t* order, void* stream) {
  if (R == 0) return 0;
  merge_kernel<<<blocks_for(R), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      R, Sa, Sb, a, b, out, order);
  return status();
}

}  // namespace rays
}  // namespace gpavatar
