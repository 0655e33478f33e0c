// Tri-plane sampling on CUDA with the arithmetic of triplane.h.
//
// Thread mapping: a group of L lanes (L a power of two <= 32, inside one warp)
// serves one point; lane l handles channels l*V, l*V + L*V, ... in vectors of V
// (V = 4 when C % 4 == 0 and the planes are 16-byte aligned), so a texel's
// channels-last row is read by consecutive lanes (coalesced).  Per-point sums
// over channels (the coordinate gradient) are reduced with warp shuffles in a
// fixed order: no atomics there.  The plane gradient either adds with float
// atomics (fast) or is gathered per texel from points sorted by cell
// (deterministic; the sort is done by the caller).
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda_common.cuh"
#include "triplane/triplane.h"

namespace gpavatar {
namespace triplane {
namespace {

constexpr int kThreads = kThreadsPerBlock;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// V consecutive plane elements widened to float; the caller guarantees alignment to
// V * sizeof(T) when V > 1.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* src, float out[V]) {
  if constexpr (std::is_same_v<T, float>) {
    load_floats<V>(src, out);
  } else {
    const Vec<T, V> packed = *reinterpret_cast<const Vec<T, V>*>(src);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(packed.v[i]);
  }
}

// Upstream gradient of plane t's reading for channels [c, c + V).
template <int V>
__device__ __forceinline__ void upstream(const Args& a, const float* g_row, int t, int64_t c,
                                         float g[V]) {
  load_floats<V>(g_row + (a.concat ? t * a.C : 0) + c, g);
  if (!a.concat) {
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] = g[i] / 3.f;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) forward_kernel(Args a, int lanes,
                                                           float* __restrict__ out) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bm = thread / lanes;
  if (bm >= a.B * a.M) return;
  const int lane = static_cast<int>(thread % lanes);
  const T* planes = static_cast<const T*>(a.planes);
  const int64_t H = a.H, W = a.W, C = a.C, plane_size = H * W * C;
  const int64_t b = bm / a.M;
  const float* point = a.coords + bm * 3;
  float* o = out + bm * out_row(a);
  for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += static_cast<int64_t>(lanes) * V) {
    float total[V];  // ((f0 + f1) + f2), the rounding of the reference's sum
#pragma unroll
    for (int t = 0; t < 3; ++t) {
      const Cell cell = locate_on_plane(point, t, H, W);
      float acc[V];
      const float start = miss_value(cell);  // 0, NaN for a non-finite point
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = start;
      const T* plane = planes + (b * 3 + t) * plane_size + c;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!corner_inside(cell, k, H, W)) continue;
        const float w = corner_weight(cell, k);
        float value[V];
        load_vec<T, V>(plane + corner_texel(cell, k, W) * C, value);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w * value[i];
      }
      if (a.concat) {
        store_floats<V>(o + t * C + c, acc);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) total[i] = t == 0 ? acc[i] : total[i] + acc[i];
      }
    }
    if (!a.concat) {
#pragma unroll
      for (int i = 0; i < V; ++i) total[i] = total[i] / 3.f;
      store_floats<V>(o + c, total);
    }
  }
  if (a.E > 0) {  // the row's extra features after the tri-plane ones (V | E: vector_width)
    const float* src = a.extra + bm * a.E;
    float* dst = o + feature_width(a);
    for (int64_t e = static_cast<int64_t>(lane) * V; e < a.E; e += static_cast<int64_t>(lanes) * V) {
      float value[V];
      load_floats<V>(src + e, value);
      store_floats<V>(dst + e, value);
    }
  }
}

// dst[i] += w * g[i] with float atomics; one 16-byte vector atomic on sm_90+.
template <int V>
__device__ __forceinline__ void add_atomic(float* dst, float w, const float g[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && CUDART_VERSION >= 12040
  if constexpr (V == 4) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(w * g[0], w * g[1], w * g[2], w * g[3]));
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(dst + i, w * g[i]);
  }
}

// Fast backward: coordinate gradient (shuffles) and, when grad_planes is given,
// the plane gradient with float atomics.  Every thread of the grid stays alive to
// the end so the shuffles see full warps.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_kernel(Args a, int lanes,
                                                            const float* __restrict__ grad_out,
                                                            float* __restrict__ grad_planes,
                                                            float* __restrict__ grad_coords) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bm_raw = thread / lanes;
  const bool active = bm_raw < a.B * a.M;
  const int64_t bm = active ? bm_raw : 0;
  const int lane = static_cast<int>(thread % lanes);
  const T* planes = static_cast<const T*>(a.planes);
  const int64_t H = a.H, W = a.W, C = a.C, plane_size = H * W * C;
  const int64_t b = bm / a.M;
  const float* point = a.coords + bm * 3;
  const float* g_row = grad_out + bm * feature_width(a);
  float grad[3] = {0.f, 0.f, 0.f};
  for (int t = 0; t < 3; ++t) {
    Cell cell = locate_on_plane(point, t, H, W);
    cell.hit = cell.hit && active;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    if (cell.hit) {
      const T* plane = planes + (b * 3 + t) * plane_size;
      float* gplane = grad_planes != nullptr ? grad_planes + (b * 3 + t) * plane_size : nullptr;
      for (int64_t c = static_cast<int64_t>(lane) * V; c < C;
           c += static_cast<int64_t>(lanes) * V) {
        float g[V];
        upstream<V>(a, g_row, t, c, g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!corner_inside(cell, k, H, W)) continue;
          const int64_t offset = corner_texel(cell, k, W) * C + c;
          if (grad_coords != nullptr) {
            float value[V];
            load_vec<T, V>(plane + offset, value);
#pragma unroll
            for (int i = 0; i < V; ++i) d[k] += g[i] * value[i];
          }
          if (gplane != nullptr) add_atomic<V>(gplane + offset, corner_weight(cell, k), g);
        }
      }
    }
    if (grad_coords != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = group_sum(d[k], lanes);
      if (cell.hit) {
        add_coord_grad(cell, d, t, H, W, grad);
      } else {
        add_miss_coord_grad(cell, t, grad);
      }
    }
  }
  if (grad_coords != nullptr && active && lane == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) grad_coords[bm * 3 + i] = grad[i];
  }
}

__global__ void cell_keys_kernel(Args a, int64_t* __restrict__ keys) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.B * 3 * a.M) return;
  const int64_t bt = i / a.M, m = i % a.M, b = bt / 3;
  const int t = static_cast<int>(bt % 3);
  const Cell cell = locate_on_plane(a.coords + (b * a.M + m) * 3, t, a.H, a.W);
  keys[i] = cell_key(cell, bt, a.H, a.W, a.B * 3 * (a.H + 1) * (a.W + 1));
}

// Deterministic plane gradient: a group of lanes per texel (same channel mapping as
// above) sums the contributions of the points of its four cells in sorted order.
template <int V>
__global__ void __launch_bounds__(kThreads) gather_kernel(Args a, int lanes,
                                                          const float* __restrict__ grad_out,
                                                          const int64_t* __restrict__ order,
                                                          const int64_t* __restrict__ cell_start,
                                                          float* __restrict__ grad_planes) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t texel = thread / lanes;  // over (b, t, y, x)
  const int64_t H = a.H, W = a.W, C = a.C;
  if (texel >= a.B * 3 * H * W) return;
  const int lane = static_cast<int>(thread % lanes);
  const int64_t x = texel % W, y = (texel / W) % H, bt = texel / (H * W);
  const int t = static_cast<int>(bt % 3);
  const int64_t row = feature_width(a);
  for (int64_t c = static_cast<int64_t>(lane) * V; c < C; c += static_cast<int64_t>(lanes) * V) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    // The cells this texel is a corner of: (y0, x0) in {y-1, y} x {x-1, x}, i.e. keys
    // (y0 + 1, x0 + 1) in {y, y+1} x {x, x+1}; corner k = (y - y0) * 2 + (x - x0).
    for (int dy = 0; dy < 2; ++dy) {
      for (int dx = 0; dx < 2; ++dx) {
        const int64_t key = (bt * (H + 1) + y + dy) * (W + 1) + x + dx;
        const int k = (1 - dy) * 2 + (1 - dx);
        for (int64_t j = cell_start[key]; j < cell_start[key + 1]; ++j) {
          const int64_t bm = (bt / 3) * a.M + order[j] % a.M;
          const Cell cell = locate_on_plane(a.coords + bm * 3, t, H, W);
          const float w = corner_weight(cell, k);
          float g[V];
          upstream<V>(a, grad_out + bm * row, t, c, g);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += w * g[i];
        }
      }
    }
    store_floats<V>(grad_planes + texel * C + c, acc);
  }
}

int vector_width(const Args& a, const float* grad_out) {
  const bool extra_ok = a.E == 0 || (a.E % 4 == 0 && aligned16(a.extra));
  return a.C % 4 == 0 && extra_ok && aligned16(a.planes) && (grad_out == nullptr || aligned16(grad_out))
             ? 4
             : 1;
}

template <typename Fn>
int dispatch(const Args& a, int V, Fn&& fn) {
  switch (a.dtype) {
    case kFloat16:
      return V == 4 ? fn(Half{}, std::integral_constant<int, 4>{})
                    : fn(Half{}, std::integral_constant<int, 1>{});
    case kBFloat16:
      return V == 4 ? fn(BFloat16{}, std::integral_constant<int, 4>{})
                    : fn(BFloat16{}, std::integral_constant<int, 1>{});
    default:
      return V == 4 ? fn(0.f, std::integral_constant<int, 4>{})
                    : fn(0.f, std::integral_constant<int, 1>{});
  }
}

}  // namespace

int launch_forward_cuda(const Args& a, float* out, void* stream) {
  const int64_t n = a.B * a.M;
  if (n == 0 || a.C == 0) return 0;
  const int V = vector_width(a, nullptr);
  const int lanes = lanes_for(a.C, V);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(a, V, [&](auto tag, auto vec) {
    using T = decltype(tag);
    forward_kernel<T, decltype(vec)::value><<<blocks_for(n * lanes), kThreads, 0, s>>>(a, lanes, out);
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_backward_cuda(const Args& a, const float* grad_out, float* grad_planes,
                         float* grad_coords, void* stream) {
  const int64_t n = a.B * a.M;
  if (n == 0 || a.C == 0 || (grad_planes == nullptr && grad_coords == nullptr)) return 0;
  const int V = vector_width(a, grad_out);
  const int lanes = lanes_for(a.C, V);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(a, V, [&](auto tag, auto vec) {
    using T = decltype(tag);
    backward_kernel<T, decltype(vec)::value><<<blocks_for(n * lanes), kThreads, 0, s>>>(
        a, lanes, grad_out, grad_planes, grad_coords);
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_cell_keys_cuda(const Args& a, int64_t* keys, void* stream) {
  const int64_t n = a.B * 3 * a.M;
  if (n == 0) return 0;
  cell_keys_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, keys);
  return static_cast<int>(cudaGetLastError());
}

int launch_gather_planes_cuda(const Args& a, const float* grad_out, const int64_t* order,
                              const int64_t* cell_start, float* grad_planes, void* stream) {
  const int64_t texels = a.B * 3 * a.H * a.W;
  if (texels == 0 || a.C == 0) return 0;
  const int V = a.C % 4 == 0 && aligned16(grad_out) && aligned16(grad_planes) ? 4 : 1;
  const int lanes = lanes_for(a.C, V);
  auto s = static_cast<cudaStream_t>(stream);
  if (V == 4) {
    gather_kernel<4><<<blocks_for(texels * lanes), kThreads, 0, s>>>(a, lanes, grad_out, order,
                                                                    cell_start, grad_planes);
  } else {
    gather_kernel<1><<<blocks_for(texels * lanes), kThreads, 0, s>>>(a, lanes, grad_out, order,
                                                                    cell_start, grad_planes);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace triplane
}  // namespace gpavatar
