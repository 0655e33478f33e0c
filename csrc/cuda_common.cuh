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

}  // namespace gpavatar
