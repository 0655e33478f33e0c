// Launch helpers shared by the .cu files (no torch headers).
//
// Several kernels serve one item (a point, a ray) with a group of `lanes` threads
// (a power of two <= 32, aligned inside a warp), each lane handling a strided slice
// of the channels in vectors of V floats.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gpavatar {

constexpr int kThreadsPerBlock = 256;

// Lanes per item: enough V-vectors to cover C, a power of two, at most a warp.
inline int lanes_for(int64_t C, int V) {
  const int64_t vectors = (C + V - 1) / V;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

// Sum over the `lanes` lanes of a group (xor butterfly: every lane gets the same sum,
// in a fixed order).  Every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset, lanes);
  return v;
}

// V consecutive floats (V = 4: one 16-byte access; the address must be 16-byte aligned).
template <int V>
__device__ __forceinline__ void load_floats(const float* src, float out[V]) {
  if constexpr (V == 4) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(src));
    out[0] = x.x;
    out[1] = x.y;
    out[2] = x.z;
    out[3] = x.w;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = __ldg(src + i);
  }
}

template <int V>
__device__ __forceinline__ void store_floats(float* dst, const float v[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) dst[i] = v[i];
  }
}

}  // namespace gpavatar
