// knn_blend on CUDA: one thread per query.  The direction weights, W2 and b2
// live in shared memory; per-thread accumulators stay in registers when the
// sizes are compile-time (the paper's H = 64, C = 32), otherwise a generic
// instantiation with runtime sizes up to (128, 64) is used.  All arithmetic
// comes from knn_blend.h, shared with the CPU kernel.
#include <cuda_runtime.h>

#include <algorithm>


#include "knn_blend/knn_blend.h"
#include "knn_blend/knn_blend_tiles.h"

namespace gpavatar {
namespace knn_blend {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxHidden = 128;
constexpr int kMaxOut = 64;

// The weights every thread of a block reads, staged in shared memory.
struct SharedWeights {
  const float* w1_dir_t;  // (27, H)
  const float* w2;        // (C, H)
  const float* b2;        // (C)
};

__device__ SharedWeights stage_weights(const BlendArgs& a, int H, int C, float* smem) {
  float* w1t = smem;
  float* w2 = w1t + kEmbedDim * H;
  float* b2 = w2 + C * H;
  for (int t = threadIdx.x; t < kEmbedDim * H; t += blockDim.x) w1t[t] = a.w1_dir_t[t];
  for (int t = threadIdx.x; t < C * H; t += blockDim.x) w2[t] = a.w2[t];
  for (int t = threadIdx.x; t < C; t += blockDim.x) b2[t] = a.b2[t];
  __syncthreads();
  return {w1t, w2, b2};
}

// MinBlocks > 0: at least that many blocks per multiprocessor (the compiler then
// keeps the registers per thread under 65536 / (kThreads * MinBlocks)).
template <int HT, int CT, int MinBlocks = 0>
__global__ void __launch_bounds__(kThreads, MinBlocks) forward_kernel(BlendArgs a, float* __restrict__ out) {
  constexpr int HCap = HT > 0 ? HT : kMaxHidden;
  const int H = HT > 0 ? HT : a.H;
  const int C = CT > 0 ? CT : a.C;
  extern __shared__ float smem[];
  const SharedWeights s = stage_weights(a, H, C, smem);

  const int64_t b = blockIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= a.M) return;
  const int64_t qi = b * a.M + m;
  float w[kMaxK];
  float gamma[kEmbedDim];
  float g[HCap];
  const float total = neighbor_weights(a, qi, w);
  for (int j = 0; j < HCap; ++j) g[j] = 0.0f;
  for (int k = 0; k < a.K; ++k) {
    const float* row = neighbor_embedding(a, qi, k, gamma);
    if (row == nullptr) continue;
#pragma unroll(HT > 0 ? HCap : 1)
    for (int j = 0; j < HCap; ++j) {
      if (j < H) g[j] += w[k] * relu_f(hidden_unit(row, s.w1_dir_t, gamma, H, j));
    }
  }
  project_output(s.w2, s.b2, g, total, H, C, out + qi * C);
}

template <int HT, int CT, int MinBlocks = 0>
__global__ void __launch_bounds__(kThreads, MinBlocks) backward_kernel(BlendArgs a, const float* __restrict__ grad_out, int64_t m_begin,
                                int64_t n, float* __restrict__ hidden,
                                float* __restrict__ weight_total, float* __restrict__ delta,
                                float* __restrict__ gamma_out) {
  constexpr int HCap = HT > 0 ? HT : kMaxHidden;
  const int H = HT > 0 ? HT : a.H;
  const int C = CT > 0 ? CT : a.C;
  extern __shared__ float smem[];
  const SharedWeights s = stage_weights(a, H, C, smem);

  const int64_t b = blockIdx.y;
  const int64_t local = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (local >= n) return;
  const int64_t qi = b * a.M + m_begin + local;
  const int64_t ci = b * n + local;  // row in the chunk buffers
  float w[kMaxK];
  float gamma[kEmbedDim];
  float v[HCap];
  float g[HCap];
  weight_total[ci] = neighbor_weights(a, qi, w);
  hidden_gradient(s.w2, grad_out + qi * C, H, C, v);
  for (int j = 0; j < HCap; ++j) g[j] = 0.0f;
  for (int k = 0; k < a.K; ++k) {
    const float* row = neighbor_embedding(a, qi, k, gamma);
    float* d = delta + (ci * a.K + k) * H;
    float* ge = gamma_out + (ci * a.K + k) * kEmbedDim;
    if (row == nullptr) {
      for (int j = 0; j < H; ++j) d[j] = 0.0f;
      for (int c = 0; c < kEmbedDim; ++c) ge[c] = 0.0f;
      continue;
    }
    for (int c = 0; c < kEmbedDim; ++c) ge[c] = gamma[c];
#pragma unroll(HT > 0 ? HCap : 1)
    for (int j = 0; j < HCap; ++j) {
      if (j < H) {
        const float h = hidden_unit(row, s.w1_dir_t, gamma, H, j);
        g[j] += w[k] * relu_f(h);
        d[j] = relu_passes(h) ? w[k] * v[j] : 0.0f;
      }
    }
  }
  for (int j = 0; j < H; ++j) hidden[ci * H + j] = g[j];
}

// --- The gather backward (knn_blend.h) ----------------------------------------------

// hidden (B*M, H) = g and total (B*M) of every query: the forward without W2.  HT > 0:
// the hidden width fixed at compile time, g in registers (the forward kernel's loop; the
// runtime-size loop, g in global memory, measured 5.7 ms at the paper size on an H200).
template <int HT>
__global__ void hidden_kernel(BlendArgs a, float* __restrict__ hidden, float* __restrict__ total) {
  constexpr int HCap = HT > 0 ? HT : 1;
  const int H = HT > 0 ? HT : a.H;
  extern __shared__ float smem[];
  const SharedWeights s = stage_weights(a, H, a.C, smem);
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (qi >= a.B * a.M) return;
  float w[kMaxK];
  float gamma[kEmbedDim];
  total[qi] = neighbor_weights(a, qi, w);
  float* out = hidden + qi * H;
  if constexpr (HT > 0) {
    float g[HCap];
#pragma unroll
    for (int j = 0; j < HCap; ++j) g[j] = 0.0f;
    for (int k = 0; k < a.K; ++k) {
      const float* row = neighbor_embedding(a, qi, k, gamma);
      if (row == nullptr) continue;
#pragma unroll
      for (int j = 0; j < HCap; ++j) g[j] += w[k] * relu_f(hidden_unit(row, s.w1_dir_t, gamma, H, j));
    }
#pragma unroll
    for (int j = 0; j < HCap; ++j) out[j] = g[j];
  } else {
    for (int j = 0; j < H; ++j) out[j] = 0.0f;
    for (int k = 0; k < a.K; ++k) {
      const float* row = neighbor_embedding(a, qi, k, gamma);
      if (row == nullptr) continue;
      for (int j = 0; j < H; ++j) out[j] += w[k] * relu_f(hidden_unit(row, s.w1_dir_t, gamma, H, j));
    }
  }
}

constexpr int kGatherWarps = 8;  // warps (chunks) per block

// One warp per chunk; lane l owns the hidden units j = l + 32 u (u < U, H <= 32 U).
// The block's warps add their grad_w1 shares in warp order into part_w1[block].
template <int U>
__global__ void __launch_bounds__(32 * kGatherWarps, U <= 2 ? 2 : 1)
    gather_kernel(BlendArgs a, const float* __restrict__ v, const int64_t* __restrict__ perm,
                  const int64_t* __restrict__ row_start, const int64_t* __restrict__ chunk_start,
                  int64_t rows, int64_t max_chunks, float* __restrict__ part_table,
                  float* __restrict__ part_w1) {
  __shared__ float w1t[kEmbedDim * kMaxHidden];
  __shared__ float share[kEmbedDim * kMaxHidden];
  const int H = a.H;
  for (int t = threadIdx.x; t < kEmbedDim * H; t += blockDim.x) {
    w1t[t] = a.w1_dir_t[t];
    share[t] = 0.0f;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kGatherWarps + warp;
  const int64_t chunks = chunk_start[rows];
  float acc_t[U];
  float acc_w[kEmbedDim][U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    acc_t[u] = 0.0f;
#pragma unroll
    for (int e = 0; e < kEmbedDim; ++e) acc_w[e][u] = 0.0f;
  }
  if (chunk < chunks) {
    const int64_t row = chunk_row(chunk_start, rows, chunk);
    const int64_t s0 = row_start[row] + (chunk - chunk_start[row]) * kGatherChunk;
    const int64_t s1 = min(s0 + kGatherChunk, row_start[row + 1]);
    float gamma[kEmbedDim];
    for (int64_t s = s0; s < s1; ++s) {
      float weight;
      int64_t qi;
      const float* trow = pair_terms(a, perm[s], gamma, weight, qi);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = lane + 32 * u;
        if (j < H) {
          const float h = hidden_unit(trow, w1t, gamma, H, j);
          const float d = relu_passes(h) ? weight * v[qi * H + j] : 0.0f;
          acc_t[u] += d;
#pragma unroll
          for (int e = 0; e < kEmbedDim; ++e) acc_w[e][u] += d * gamma[e];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = lane + 32 * u;
      if (j < H) part_table[chunk * H + j] = acc_t[u];
    }
  }
  // grad_w1: the warps' shares in warp order (deterministic), one block share out.
  for (int w = 0; w < kGatherWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = lane + 32 * u;
        if (j < H) {
#pragma unroll
          for (int e = 0; e < kEmbedDim; ++e) share[e * H + j] += acc_w[e][u];
        }
      }
    }
    __syncthreads();
  }
  float* out = part_w1 + static_cast<int64_t>(blockIdx.x) * kEmbedDim * H;
  for (int t = threadIdx.x; t < kEmbedDim * H; t += blockDim.x) out[t] = share[t];
}

// grad_table[row, j] = the ordered sum of the row's chunk shares.
__global__ void gather_reduce_kernel(const int64_t* __restrict__ chunk_start, int64_t rows, int H,
                                     const float* __restrict__ part_table, float* __restrict__ grad_table) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * H) return;
  const int64_t row = t / H;
  const int j = static_cast<int>(t - row * H);
  float sum = 0.0f;
  for (int64_t c = chunk_start[row]; c < chunk_start[row + 1]; ++c) sum += part_table[c * H + j];
  grad_table[t] = sum;
}

// --- The tiled kernels (knn_blend_tiles.h) ------------------------------------------

__global__ void __launch_bounds__(kTileThreads, kTileForwardBlocksPerSM)
    tiles_forward_kernel(BlendArgs a, float* __restrict__ out) {
  extern __shared__ __align__(16) float sh[];
  const int t = threadIdx.x;
  tile_stage_forward_weights(a, t, kTileThreads, sh);
  const int64_t tiles = tile_count(a);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();  // the previous tile's output phase is done with g
    tile_pair_terms(a, tile, t, sh);
    __syncthreads();
    tile_hidden_forward(a, t, sh);
    __syncthreads();
    tile_output(a, tile, t, sh, out);
  }
}

// The forward with phase B on the tensor cores (knn_blend_tiles.h: GPAVATAR_BLEND_FORWARD=tiles_tf32).
// One mma.m16n8k8 TF32 product (D += A B): a, the 16 x 8 weights fragment (TF32 bits), b the 8 x 8
// gamma fragment (TF32-rounded floats).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const float (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  __trap();  // never launched below compute capability 8.0 (knn_blend_cuda.cpp checks)
#endif
}

// Phase B of the tensor-core forward for warp t / 32: g of the tile's 16 queries, 16 units.
__device__ __forceinline__ void tile_hidden_forward_tc(const BlendArgs& a, int t, float* sh,
                                                       const unsigned (&wa)[kTcSteps][4]) {
  const int w = t >> 5, lane = t & 31;
  float next[4];
  tc_table_fragment(a, sh, w, lane, 0, next);
#pragma unroll 4
  for (int n = 0; n < kTileQueries; ++n) {
    float rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) rows[i] = next[i];
    if (n + 1 < kTileQueries) tc_table_fragment(a, sh, w, lane, n + 1, next);  // in flight during the products
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < kTcSteps; ++s) {
      float b[2];
      tc_b_fragment(sh, lane, n, s, b);
      mma_tf32(d, wa[s], b);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] += rows[i];
    float lo, hi;
    tc_lane_terms(sh, lane, n, d, lo, hi);
    lo += __shfl_xor_sync(0xffffffffu, lo, 1);
    hi += __shfl_xor_sync(0xffffffffu, hi, 1);
    lo += __shfl_xor_sync(0xffffffffu, lo, 2);
    hi += __shfl_xor_sync(0xffffffffu, hi, 2);
    tc_store_g(sh, w, lane, n, lo, hi);
  }
}

__global__ void __launch_bounds__(kTileThreads, kTileTcBlocksPerSM)
    tiles_forward_tc_kernel(BlendArgs a, float* __restrict__ out) {
  extern __shared__ __align__(16) float sh[];
  const int t = threadIdx.x;
  tile_stage_forward_weights(a, t, kTileThreads, sh, /*tf32=*/true);
  __syncthreads();
  unsigned wa[kTcSteps][4];  // this warp's weights fragments, for every tile
#pragma unroll
  for (int s = 0; s < kTcSteps; ++s) {
    float f[4];
    tc_a_fragment(sh, t >> 5, t & 31, s, f);
#pragma unroll
    for (int i = 0; i < 4; ++i) wa[s][i] = __float_as_uint(f[i]);
  }
  const int64_t tiles = tile_count(a);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();  // the previous tile's output phase is done with g
    tile_pair_terms(a, tile, t, sh, /*tf32=*/true);
    __syncthreads();
    tile_hidden_forward_tc(a, t, sh, wa);
    __syncthreads();
    tile_output(a, tile, t, sh, out);
  }
}

__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSM)
    tiles_backward_kernel(BlendArgs a, const float* __restrict__ grad_out, float* __restrict__ hidden,
                          float* __restrict__ total, float* __restrict__ grad_table, float* __restrict__ part_w1) {
  extern __shared__ __align__(16) float sh[];
  const int t = threadIdx.x;
  tile_stage_weights(a, t, kTileThreads, sh);
  float acc[kEmbedDim];
#pragma unroll
  for (int c = 0; c < kEmbedDim; ++c) acc[c] = 0.0f;
  const int64_t tiles = tile_count(a);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();  // the previous tile's phase C is done with gamma and delta
    tile_pair_terms(a, tile, t, sh);
    __syncthreads();
    tile_hidden_backward(a, grad_out, tile, t, sh, hidden, total, grad_table);
    __syncthreads();
    tile_w1_accumulate(t, sh, acc);
  }
  tile_w1_store(t, acc, part_w1 + static_cast<int64_t>(blockIdx.x) * 2 * kEmbedDim * kTileH);
}

// GPAVATAR_BLEND_CUDA_VARIANT selects how the H = 64, C = 32 case is compiled
// (the same arithmetic in each; only the default has been measured, on an H200):
//   default    sizes fixed at compile time, accumulators in registers (~220 per
//              thread: 8 resident warps per multiprocessor)
//   occupancy  the same, compiled for four resident blocks (<= 128 registers,
//              16 warps; some spilling)
//   generic    the runtime-size kernel (~60 registers, accumulators in local memory)
// (BlendArgs::cuda_variant, set from the environment by knn_blend_cuda.cpp).

size_t shared_bytes(int H, int C) {
  return sizeof(float) * (static_cast<size_t>(kEmbedDim) * H + static_cast<size_t>(C) * H + C);
}

}  // namespace

int launch_knn_blend_forward_cuda(const BlendArgs& a, float* out, void* stream) {
  if (a.B == 0 || a.M == 0) return 0;
  if (a.H > kMaxHidden || a.C > kMaxOut) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((a.M + kThreads - 1) / kThreads),
                  static_cast<unsigned>(a.B));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const size_t smem = shared_bytes(a.H, a.C);
  if (a.H == 64 && a.C == 32 && a.cuda_variant == kVariantOccupancy) {
    forward_kernel<64, 32, 4><<<grid, kThreads, smem, s>>>(a, out);
  } else if (a.H == 64 && a.C == 32 && a.cuda_variant == kVariantDefault) {
    forward_kernel<64, 32><<<grid, kThreads, smem, s>>>(a, out);
  } else {
    forward_kernel<0, 0><<<grid, kThreads, smem, s>>>(a, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_blend_hidden_cuda(const BlendArgs& a, float* hidden, float* total, void* stream) {
  const int64_t n = a.B * a.M;
  if (n == 0) return 0;
  if (a.H > kMaxHidden || a.C > kMaxOut) return static_cast<int>(cudaErrorInvalidValue);
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.H == 64) {
    hidden_kernel<64><<<blocks, kThreads, shared_bytes(a.H, a.C), s>>>(a, hidden, total);
  } else {
    hidden_kernel<0><<<blocks, kThreads, shared_bytes(a.H, a.C), s>>>(a, hidden, total);
  }
  return static_cast<int>(cudaGetLastError());
}

int64_t gather_blocks(int64_t max_chunks) { return std::max<int64_t>(1, (max_chunks + kGatherWarps - 1) / kGatherWarps); }

int launch_knn_blend_gather_cuda(const BlendArgs& a, const float* v, const int64_t* perm,
                                 const int64_t* row_start, const int64_t* chunk_start, int64_t rows,
                                 int64_t max_chunks, float* part_table, float* part_w1, void* stream) {
  if (a.H > kMaxHidden) return static_cast<int>(cudaErrorInvalidValue);
  const unsigned blocks = static_cast<unsigned>(gather_blocks(max_chunks));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.H <= 64) {
    gather_kernel<2><<<blocks, 32 * kGatherWarps, 0, s>>>(a, v, perm, row_start, chunk_start, rows,
                                                           max_chunks, part_table, part_w1);
  } else {
    gather_kernel<kMaxHidden / 32><<<blocks, 32 * kGatherWarps, 0, s>>>(
        a, v, perm, row_start, chunk_start, rows, max_chunks, part_table, part_w1);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_blend_gather_reduce_cuda(const int64_t* chunk_start, int64_t rows, int H,
                                        const float* part_table, float* grad_table, void* stream) {
  const int64_t n = rows * H;
  if (n == 0) return 0;
  gather_reduce_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      chunk_start, rows, H, part_table, grad_table);
  return static_cast<int>(cudaGetLastError());
}

// Dynamic shared memory past 48 KiB needs the attribute; set on every call (it belongs to
// the current device; cheap, no synchronisation).
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// A tiled forward kernel (fp32 or tensor cores) over every tile, per_multiprocessor blocks an SM.
template <typename Kernel>
int launch_tiles_forward(Kernel kernel, int per_multiprocessor, const BlendArgs& a, int multiprocessors, float* out,
                         void* stream) {
  if (!tiles_forward_supported(a)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.B * a.M == 0) return 0;
  const size_t smem = sizeof(float) * kTileForwardFloats;
  const cudaError_t attr = allow_shared(kernel, smem);
  if (attr != cudaSuccess) return static_cast<int>(attr);
  const int64_t blocks = tile_blocks(tile_count(a), multiprocessors, per_multiprocessor);
  kernel<<<static_cast<unsigned>(blocks), kTileThreads, smem, static_cast<cudaStream_t>(stream)>>>(a, out);
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_blend_tiles_forward_cuda(const BlendArgs& a, int multiprocessors, float* out, void* stream) {
  return launch_tiles_forward(tiles_forward_kernel, kTileForwardBlocksPerSM, a, multiprocessors, out, stream);
}

int launch_knn_blend_tiles_forward_tc_cuda(const BlendArgs& a, int multiprocessors, float* out, void* stream) {
  return launch_tiles_forward(tiles_forward_tc_kernel, kTileTcBlocksPerSM, a, multiprocessors, out, stream);
}

int launch_knn_blend_tiles_backward_cuda(const BlendArgs& a, const float* grad_out, int multiprocessors,
                                         float* hidden, float* total, float* grad_table, float* part_w1,
                                         void* stream) {
  if (!tiles_supported(a)) return static_cast<int>(cudaErrorInvalidValue);
  const size_t smem = sizeof(float) * kTileSharedFloats;
  const cudaError_t attr = allow_shared(tiles_backward_kernel, smem);
  if (attr != cudaSuccess) return static_cast<int>(attr);
  const int64_t blocks = tile_blocks(tile_count(a), multiprocessors);
  tiles_backward_kernel<<<static_cast<unsigned>(blocks), kTileThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      a, grad_out, hidden, total, grad_table, part_w1);
  return static_cast<int>(cudaGetLastError());
}

int launch_knn_blend_backward_cuda(const BlendArgs& a, const float* grad_out, int64_t m_begin,
                                   int64_t m_end, float* hidden, float* weight_total,
                                   float* delta, float* gamma, void* stream) {
  const int64_t n = m_end - m_begin;
  if (a.B == 0 || n <= 0) return 0;
  if (a.H > kMaxHidden || a.C > kMaxOut) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                  static_cast<unsigned>(a.B));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const size_t smem = shared_bytes(a.H, a.C);
  if (a.H == 64 && a.C == 32 && a.cuda_variant == kVariantOccupancy) {
    backward_kernel<64, 32, 4><<<grid, kThreads, smem, s>>>(a, grad_out, m_begin, n, hidden,
                                                            weight_total, delta, gamma);
  } else if (a.H == 64 && a.C == 32 && a.cuda_variant == kVariantDefault) {
    backward_kernel<64, 32><<<grid, kThreads, smem, s>>>(a, grad_out, m_begin, n, hidden,
                                                         weight_total, delta, gamma);
  } else {
    backward_kernel<0, 0><<<grid, kThreads, smem, s>>>(a, grad_out, m_begin, n, hidden,
                                                       weight_total, delta, gamma);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace knn_blend
}  // namespace gpavatar
