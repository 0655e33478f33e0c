// Shared helpers for gpavatar's kernels: the host/device qualifier used by the
// arithmetic headers, and arithmetic that must not be contracted into FMAs so
// that the CPU and CUDA kernels (and the torch reference) agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

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

// Where data may hold NaN, follow torch so every backend puts NaN where the reference
// does (fmaxf / fminf drop a NaN, and so does max_f(NaN, b)):
// clamp_min_f(x, floor) is torch.clamp_min (NaN x -> NaN), relu_f is torch.relu
// (NaN -> NaN), relu_passes is the mask of torch's relu backward (threshold_backward:
// the gradient passes unless x <= 0, so it passes at NaN).
GPA_HD float clamp_min_f(float x, float floor) { return x < floor ? floor : x; }
GPA_HD float relu_f(float x) { return x < 0.0f ? 0.0f : x; }
// false for NaN and +-inf (x - x is 0 for every finite x; nothing here builds with fast-math).
GPA_HD bool finite_f(float x) { return x - x == 0.0f; }
GPA_HD bool relu_passes(float x) { return !(x <= 0.0f); }

// a * b rounded on its own (never contracted into an FMA with a following add),
// and a + b likewise; T is float or double.  nvcc contracts a * b + c by default
// and the host compiler is told not to (-ffp-contract=off): arithmetic whose bits the
// CPU and CUDA paths must share is written with these.
template <typename T>
GPA_HD T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
GPA_HD T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// The bits of an int stored in a float slot, and back (packed candidate lists).
GPA_HD float int_bits_to_float(int i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

GPA_HD int float_bits_to_int(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}

}  // namespace gpavatar
