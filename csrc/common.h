// Shared helpers for gpavatar's kernels: the host/device qualifier used by the
// arithmetic headers, and arithmetic that must not be contracted into FMAs so
// that the CPU and CUDA kernels (and the torch reference) agree bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GPA_HD __host__ __device__ __forceinline__
#else
#define GPA_HD inline
#endif

namespace gpavatar {

// a * b + c * d + e * f, rounded after every operation (no FMA), in the order
// torch evaluates ((a*b + c*d) + e*f).
GPA_HD float sum_of_products3(float a, float b, float c, float d, float e, float f) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d)), __fmul_rn(e, f));
#else
  return (a * b + c * d) + e * f;
#endif
}

GPA_HD float max_f(float a, float b) { return a > b ? a : b; }

// a * b rounded on its own (never contracted into an FMA with a following add).
GPA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace gpavatar
