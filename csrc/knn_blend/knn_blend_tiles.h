// The tiled knn_blend kernels for the paper's sizes (H = 64, K <= 8; the forward also
// C = 32): the CUDA default (GPAVATAR_BLEND_FORWARD / GPAVATAR_BLEND_BACKWARD = auto or
// tiles; on an H200 at the paper size 0.80 ms forward, 2.39 ms backward).  One pass over
// the queries, nothing stored per neighbour.
//
// A block of kTileThreads threads loops over tiles of kTileQueries consecutive
// queries (qi = b * M + m); a tile's pairs are p = q * kTileK + k (k >= K: empty).
//   A (thread = pair):  w_k, gamma_k and the table row of pair p into shared memory
//                       (gamma c-major: gamma[c][p]); the query's sum_k w_k.
//   B (thread = query q, unit group u0 = 8 units): the 8 x 8 block h[k][u] =
//                       table[row][u0 + u] + sum_c w1_dir_t[c][u0 + u] gamma[c][p]
//                       (c = 0..26 in order: hidden_unit's sum), then g[u] += w_k relu(h)
//                       (in k order, like the per-query kernels).
//   forward, O (thread = query, 4 outputs): out = W2 g + b2 sum_k w_k from g in shared
//                       memory (project_output's order): the per-query kernel's numbers.
//   backward, B also:   hidden (B*M, H) = g for grad_w2 / grad_b2, and
//                       delta = w_k v[u] [h > 0] (v = W2^T grad_out) added to
//                       grad_table[row] (atomics on the GPU) and kept as delta[j][p] in
//                       shared memory;
//   backward, C (thread = unit j, half of the pairs): grad_w1[c][j] += delta[j][p]
//                       gamma[c][p] over its pairs in order, kept across the block's
//                       tiles; the block writes one share per half (the caller sums them).
// The phases are separated by block barriers on the GPU; the CPU runs each phase
// for every thread in turn (the same functions, the same shared-memory layout).
#pragma once

#include "knn_blend/knn_blend.h"

#if defined(__CUDA_ARCH__)
#define GPA_UNROLL _Pragma("unroll")
#else
#define GPA_UNROLL
#endif

namespace gpavatar {
namespace knn_blend {

constexpr int kTileQueries = 16;
constexpr int kTileK = 8;                                 // K <= 8
constexpr int kTileH = 64;                                // H = 64
constexpr int kTilePairs = kTileQueries * kTileK;         // 128
constexpr int kTileUnits = 8;                             // hidden units per thread in B
constexpr int kTileGroups = kTileH / kTileUnits;          // 8
constexpr int kTileThreads = kTileQueries * kTileGroups;  // 128 (= kTilePairs = 2 * kTileH)
constexpr int kTileDeltaStride = kTilePairs + 4;          // delta row stride (no bank conflicts)
constexpr int kTileHalf = kTilePairs / 2;                 // pairs per thread in C
// gamma row stride: 8 floats of padding make the tensor-core forward's fragment loads
// (lanes: 4 embedding rows x 8 pairs) hit 32 different banks.
constexpr int kTileGammaStride = kTilePairs + 8;

// Shared-memory layout, in floats (every region 16-byte aligned).
constexpr int kTileW1 = 0;                                  // [27][64] w1_dir_t
constexpr int kTileGamma = kTileW1 + kEmbedDim * kTileH;    // [27][kTileGammaStride]
constexpr int kTileWeight = kTileGamma + kEmbedDim * kTileGammaStride;  // [kTilePairs]
constexpr int kTileRow = kTileWeight + kTilePairs;          // [kTilePairs] table row bits (-1: none)
constexpr int kTileTotal = kTileRow + kTilePairs;           // [kTileQueries] sum_k w_k
constexpr int kTileDelta = kTileTotal + kTileQueries;       // backward: [64][kTileDeltaStride]
constexpr int kTileSharedFloats = kTileDelta + kTileH * kTileDeltaStride;
// The forward uses the delta region for g [kTileQueries][kTileGStride], w2^T [64][32] and b2.
constexpr int kTileC = 32;
constexpr int kTileGStride = kTileH + 4;
constexpr int kTileG = kTileDelta;
constexpr int kTileW2t = kTileG + kTileQueries * kTileGStride;
constexpr int kTileB2 = kTileW2t + kTileH * kTileC;
constexpr int kTileForwardFloats = kTileB2 + kTileC;
constexpr int kTileOutputs = kTileC / (kTileThreads / kTileQueries);  // outputs per thread: 4
static_assert(kTileThreads == kTilePairs && kTileThreads == 2 * kTileH && kTileOutputs == 4 && 32 % kTileK == 0,
              "phase A takes one thread per pair (a query's slots: adjacent lanes of one warp), phase C two per unit, "
              "the output 4 floats per thread");
static_assert(kTileGamma % 4 == 0 && kTileGammaStride % 4 == 0 && kTileDelta % 4 == 0 && kTileW2t % 4 == 0 && kTileDeltaStride % 4 == 0 &&
                  kTileGStride % 4 == 0,
              "float4 accesses need 16-byte aligned regions and rows");

GPA_HD bool tiles_supported(const BlendArgs& a) { return a.H == kTileH && a.K <= kTileK; }
GPA_HD bool tiles_forward_supported(const BlendArgs& a) { return tiles_supported(a) && a.C == kTileC; }

GPA_HD int64_t tile_count(const BlendArgs& a) { return (a.B * a.M + kTileQueries - 1) / kTileQueries; }

// Resident blocks per multiprocessor the CUDA kernels are compiled for (backward: 55.5 KiB
// of shared memory and <= 168 registers each; forward: 34 KiB, <= 128 registers), and the
// blocks they launch: each loops over tiles block, block + blocks, ... (a backward block
// writes 2 shares of grad_w1).
constexpr int kTileBlocksPerSM = 3;
constexpr int kTileForwardBlocksPerSM = 4;
// The tensor-core forward (phase B: 16 TF32 weights fragments and 4 accumulators a thread):
// 6 blocks of 35 KiB shared memory an SM.
constexpr int kTileTcBlocksPerSM = 6;
GPA_HD int64_t tile_blocks(int64_t tiles, int multiprocessors, int per_multiprocessor = kTileBlocksPerSM) {
  const int64_t most = static_cast<int64_t>(multiprocessors) * per_multiprocessor;
  return tiles < 1 ? 1 : (tiles < most ? tiles : most);
}

// The unnormalized weight of slot k of query qi: 1 / (d_k + eps), divided by
// weight_sum[b, k] under the "queries" normalization (then it is w_k); 0 for an empty slot.
GPA_HD float slot_weight(const BlendArgs& a, int64_t qi, int k) {
  if (qi >= a.B * a.M || k >= a.K) return 0.0f;
  const float u = inverse_distance(a.dist2[qi * a.K + k], a.eps);
  return a.weight_sum != nullptr ? u / a.weight_sum[(qi / a.M) * a.K + k] : u;
}

// w_k from the query's slot weights u[0..K) (slot_weight; uk = u[k]), the value
// neighbor_weights gives (the same sums in the same order); total = sum_k w_k when wanted.
GPA_HD float weight_from_slots(const BlendArgs& a, const float (&u)[kTileK], float uk, float* total) {
  if (a.weight_sum != nullptr) {
    if (total != nullptr) {
      float t = 0.0f;
      GPA_UNROLL
      for (int j = 0; j < kTileK; ++j) {
        if (j < a.K) t += u[j];
      }
      *total = t;
    }
    return uk;
  }
  float sum = 0.0f;
  GPA_UNROLL
  for (int j = 0; j < kTileK; ++j) {
    if (j < a.K) sum += u[j];
  }
  if (total != nullptr) {
    float t = 0.0f;
    GPA_UNROLL
    for (int j = 0; j < kTileK; ++j) {
      if (j < a.K) t += u[j] / sum;
    }
    *total = t;
  }
  return uk / sum;
}

// x rounded to TF32 (10 mantissa bits) to nearest, ties away from zero: PTX's
// cvt.rna.tf32.f32, in integer arithmetic (the same bits on the CPU and the GPU).
// Infinities and NaN stay as they are; a magnitude that rounds past the largest
// float becomes infinite.
GPA_HD float round_tf32(float x) {
  const unsigned u = static_cast<unsigned>(float_bits_to_int(x));
  if ((u & 0x7f800000u) == 0x7f800000u) return x;
  return int_bits_to_float(static_cast<int>((u + 0x1000u) & 0xffffe000u));
}

// Once per block: w1_dir_t into shared memory (thread t of n); rounded to TF32 for the
// tensor-core forward (tf32).
GPA_HD void tile_stage_weights(const BlendArgs& a, int t, int n, float* sh, bool tf32 = false) {
  for (int e = t; e < kEmbedDim * kTileH; e += n) sh[kTileW1 + e] = tf32 ? round_tf32(a.w1_dir_t[e]) : a.w1_dir_t[e];
}

// Once per block of the forward: also w2^T and b2.
GPA_HD void tile_stage_forward_weights(const BlendArgs& a, int t, int n, float* sh, bool tf32 = false) {
  tile_stage_weights(a, t, n, sh, tf32);
  for (int e = t; e < kTileH * kTileC; e += n) {
    const int j = e / kTileC, o = e - j * kTileC;
    sh[kTileW2t + e] = a.w2[o * kTileH + j];
  }
  for (int o = t; o < kTileC; o += n) sh[kTileB2 + o] = a.b2[o];
}

// Phase A, thread t = pair p (q = t / 8, k = t % 8); thread k = 0 of a query also writes
// its sum_k w_k.  Each thread computes its own slot's weight; the query's 8 threads are 8
// adjacent lanes of one warp, which exchange them with shuffles on the GPU (every thread of
// the block calls this: the shuffles need the whole warp), while the CPU recomputes them.
// tf32: gamma is stored rounded to TF32 (the tensor-core forward).
GPA_HD void tile_pair_terms(const BlendArgs& a, int64_t tile, int t, float* sh, bool tf32 = false) {
  const int q = t / kTileK, k = t - q * kTileK;
  const int64_t qi = tile * kTileQueries + q;
  float u[kTileK];
  const float own = slot_weight(a, qi, k);
#if defined(__CUDA_ARCH__)
  const int base = (threadIdx.x & 31) & ~(kTileK - 1);
#pragma unroll
  for (int j = 0; j < kTileK; ++j) u[j] = __shfl_sync(0xffffffffu, own, base + j);
#else
  for (int j = 0; j < kTileK; ++j) u[j] = slot_weight(a, qi, j);
#endif
  float gamma[kEmbedDim];
  float weight = 0.0f;
  int row = -1;
  if (qi < a.B * a.M && k < a.K) {
    float sum_w;
    weight = weight_from_slots(a, u, own, k == 0 ? &sum_w : nullptr);
    if (k == 0) sh[kTileTotal + q] = sum_w;
    const float* r = neighbor_embedding(a, qi, k, gamma);
    if (r != nullptr) row = static_cast<int>((r - a.table) / kTileH);
  }
  if (row < 0) {
    weight = 0.0f;
    for (int c = 0; c < kEmbedDim; ++c) gamma[c] = 0.0f;
  }
  GPA_UNROLL
  for (int c = 0; c < kEmbedDim; ++c) sh[kTileGamma + c * kTileGammaStride + t] = tf32 ? round_tf32(gamma[c]) : gamma[c];
  sh[kTileWeight + t] = weight;
  sh[kTileRow + t] = int_bits_to_float(row);
}

// n consecutive floats (n = 4 or 8) at s (16-byte aligned shared memory) into / from r.
template <int N>
GPA_HD void load_floats(const float* s, float (&r)[N]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 v = *reinterpret_cast<const float4*>(s + i);
    r[i] = v.x;
    r[i + 1] = v.y;
    r[i + 2] = v.z;
    r[i + 3] = v.w;
  }
#else
  for (int i = 0; i < N; ++i) r[i] = s[i];
#endif
}

// 8 floats of a table row (32-byte aligned: the CUDA callers align the table) through the
// read-only cache.
GPA_HD void load_table_floats(const float* t, float (&r)[kTileUnits]) {
#if defined(__CUDA_ARCH__)
  const float4 a = __ldg(reinterpret_cast<const float4*>(t)), b = __ldg(reinterpret_cast<const float4*>(t) + 1);
  r[0] = a.x;
  r[1] = a.y;
  r[2] = a.z;
  r[3] = a.w;
  r[4] = b.x;
  r[5] = b.y;
  r[6] = b.z;
  r[7] = b.w;
#else
  for (int u = 0; u < kTileUnits; ++u) r[u] = t[u];
#endif
}

GPA_HD void store_floats4(float* s, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(s) = make_float4(a, b, c, d);
#else
  s[0] = a;
  s[1] = b;
  s[2] = c;
  s[3] = d;
#endif
}

// dst[0 .. 8) += d: grad_table (allocated by the caller, 32-byte aligned; atomics on the GPU).
GPA_HD void tile_add_row(float* dst, const float (&d)[kTileUnits]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(d[0], d[1], d[2], d[3]));
  atomicAdd(reinterpret_cast<float4*>(dst) + 1, make_float4(d[4], d[5], d[6], d[7]));
#elif defined(__CUDA_ARCH__)
#pragma unroll
  for (int u = 0; u < kTileUnits; ++u) atomicAdd(dst + u, d[u]);
#else
  for (int u = 0; u < kTileUnits; ++u) dst[u] += d[u];
#endif
}

// Phase B, thread t = (unit group t / kTileQueries, query q = t % kTileQueries):
// h[k][u] = table[row_k][u0 + u] + sum_c w1_dir_t[c][u0 + u] gamma[c][p_k] (hidden_unit's sum).
GPA_HD void tile_hidden(const BlendArgs& a, int t, const float* sh, float (&h)[kTileK][kTileUnits]) {
  const int q = t % kTileQueries, u0 = (t / kTileQueries) * kTileUnits;
  GPA_UNROLL
  for (int k = 0; k < kTileK; ++k) {
    // Row 0 stands in for an empty slot (loaded, then zeroed: no branch around the loads).
    const int row = float_bits_to_int(sh[kTileRow + q * kTileK + k]);
    float tr[kTileUnits];
    load_table_floats(a.table + static_cast<int64_t>(row < 0 ? 0 : row) * kTileH + u0, tr);
    GPA_UNROLL
    for (int u = 0; u < kTileUnits; ++u) h[k][u] = row < 0 ? 0.0f : tr[u];
  }
  const float* gam = sh + kTileGamma + q * kTileK;
  const float* w1 = sh + kTileW1 + u0;
  for (int c = 0; c < kEmbedDim; ++c) {
    float gc[kTileK], wc[kTileUnits];
    load_floats(gam + c * kTileGammaStride, gc);
    load_floats(w1 + c * kTileH, wc);
    GPA_UNROLL
    for (int k = 0; k < kTileK; ++k) {
      GPA_UNROLL
      for (int u = 0; u < kTileUnits; ++u) h[k][u] += wc[u] * gc[k];
    }
  }
}

// g[u] = sum_k w_k relu(h[k][u]) over the query's neighbours in k order (the per-query
// kernels' order); Delta: also h[k][u] := delta = w_k v[u] [h > 0] (0 for an empty slot).
template <bool Delta>
GPA_HD void tile_blend(const float* sh, int q, const float (&v)[kTileUnits], float (&h)[kTileK][kTileUnits],
                       float (&g)[kTileUnits]) {
  GPA_UNROLL
  for (int u = 0; u < kTileUnits; ++u) g[u] = 0.0f;
  GPA_UNROLL
  for (int k = 0; k < kTileK; ++k) {
    const int row = float_bits_to_int(sh[kTileRow + q * kTileK + k]);
    const float w = sh[kTileWeight + q * kTileK + k];
    GPA_UNROLL
    for (int u = 0; u < kTileUnits; ++u) {
      const float hk = h[k][u];
      if (row >= 0) g[u] += w * relu_f(hk);
      if (Delta) h[k][u] = row >= 0 && relu_passes(hk) ? w * v[u] : 0.0f;
    }
  }
}

// Phase B of the forward: g = sum_k w_k relu(h_k) (the forward's order) into shared memory.
GPA_HD void tile_hidden_forward(const BlendArgs& a, int t, float* sh) {
  const int q = t % kTileQueries, u0 = (t / kTileQueries) * kTileUnits;
  float h[kTileK][kTileUnits];
  tile_hidden(a, t, sh, h);
  float g[kTileUnits];
  const float no_v[kTileUnits] = {};
  tile_blend<false>(sh, q, no_v, h, g);
  float* gs = sh + kTileG + q * kTileGStride + u0;
  store_floats4(gs, g[0], g[1], g[2], g[3]);
  store_floats4(gs + 4, g[4], g[5], g[6], g[7]);
}

// The forward's output, thread t = (query t / 8, outputs o0 = 4 (t % 8) .. o0 + 4):
// out[o] = sum_j w2[o][j] g[j] + b2[o] sum_k w_k (project_output's order).
GPA_HD void tile_output(const BlendArgs& a, int64_t tile, int t, const float* sh, float* out) {
  constexpr int kPerQuery = kTileThreads / kTileQueries;
  const int q = t / kPerQuery, o0 = (t % kPerQuery) * kTileOutputs;
  const int64_t qi = tile * kTileQueries + q;
  if (qi >= a.B * a.M) return;
  const float* g = sh + kTileG + q * kTileGStride;
  float acc[kTileOutputs];
  GPA_UNROLL
  for (int i = 0; i < kTileOutputs; ++i) acc[i] = 0.0f;
  for (int j = 0; j < kTileH; j += 4) {
    float gj[4];
    load_floats(g + j, gj);
    GPA_UNROLL
    for (int e = 0; e < 4; ++e) {
      float w[kTileOutputs];
      load_floats(sh + kTileW2t + (j + e) * kTileC + o0, w);
      GPA_UNROLL
      for (int i = 0; i < kTileOutputs; ++i) acc[i] += w[i] * gj[e];
    }
  }
  const float total = sh[kTileTotal + q];
  float* o = out + qi * kTileC + o0;
  store_floats4(o, acc[0] + sh[kTileB2 + o0] * total, acc[1] + sh[kTileB2 + o0 + 1] * total,
                acc[2] + sh[kTileB2 + o0 + 2] * total, acc[3] + sh[kTileB2 + o0 + 3] * total);
}

// Phase B of the backward (same threads): also writes total[qi] and hidden[qi] (g).
GPA_HD void tile_hidden_backward(const BlendArgs& a, const float* grad_out, int64_t tile, int t, float* sh,
                                 float* hidden, float* total, float* grad_table) {
  const int q = t % kTileQueries, u0 = (t / kTileQueries) * kTileUnits;
  const int64_t qi = tile * kTileQueries + q;
  const bool live = qi < a.B * a.M;
  if (live && u0 == 0) total[qi] = sh[kTileTotal + q];
  // v = W2^T grad_out for this thread's units (hidden_gradient's order).
  float v[kTileUnits];
  GPA_UNROLL
  for (int u = 0; u < kTileUnits; ++u) v[u] = 0.0f;
  if (live) {
    for (int o = 0; o < a.C; ++o) {
      const float go = grad_out[qi * a.C + o];
      const float* w = a.w2 + o * kTileH + u0;
      GPA_UNROLL
      for (int u = 0; u < kTileUnits; ++u) v[u] += w[u] * go;
    }
  }
  float h[kTileK][kTileUnits];
  tile_hidden(a, t, sh, h);
  float g[kTileUnits];
  tile_blend<true>(sh, q, v, h, g);
  GPA_UNROLL
  for (int k = 0; k < kTileK; ++k) {
    const int row = float_bits_to_int(sh[kTileRow + q * kTileK + k]);
    if (row >= 0) tile_add_row(grad_table + static_cast<int64_t>(row) * kTileH + u0, h[k]);
  }
  float* dl = sh + kTileDelta + u0 * kTileDeltaStride + q * kTileK;
  GPA_UNROLL
  for (int u = 0; u < kTileUnits; ++u) {
    store_floats4(dl + u * kTileDeltaStride, h[0][u], h[1][u], h[2][u], h[3][u]);
    store_floats4(dl + u * kTileDeltaStride + 4, h[4][u], h[5][u], h[6][u], h[7][u]);
  }
  if (live) {
    GPA_UNROLL
    for (int u = 0; u < kTileUnits; ++u) hidden[qi * kTileH + u0 + u] = g[u];
  }
}

// Phase C, thread t = (half t / kTileH, unit j = t % kTileH): acc[c] += delta[j][p] gamma[c][p]
// over the half's pairs in order.
GPA_HD void tile_w1_accumulate(int t, const float* sh, float (&acc)[kEmbedDim]) {
  const int j = t % kTileH, p0 = (t / kTileH) * kTileHalf;
  const float* dl = sh + kTileDelta + j * kTileDeltaStride + p0;
  const float* gam = sh + kTileGamma + p0;
  for (int p = 0; p < kTileHalf; p += 4) {
    float d[4];
    load_floats(dl + p, d);
    GPA_UNROLL
    for (int c = 0; c < kEmbedDim; ++c) {
      float gc[4];
      load_floats(gam + c * kTileGammaStride + p, gc);
      GPA_UNROLL
      for (int e = 0; e < 4; ++e) acc[c] += d[e] * gc[e];
    }
  }
}

// The block's share of grad_w1 (27, H) from thread t's accumulators: part[half][c][j].
GPA_HD void tile_w1_store(int t, const float (&acc)[kEmbedDim], float* part) {
  const int j = t % kTileH, half = t / kTileH;
  GPA_UNROLL
  for (int c = 0; c < kEmbedDim; ++c) part[(half * kEmbedDim + c) * kTileH + j] = acc[c];
}

// --- Phase B on the tensor cores (GPAVATAR_BLEND_FORWARD=tiles_tf32) ----------------
// The tile's hidden pre-activations as one TF32 product per warp, transposed:
//   H^T (64 units x 128 pairs) = W (64 x 32) Gamma (32 x 128), then + table rows^T,
// W[u][c] = w1_dir_t[c][u] and Gamma[c][p] = gamma[c][p] (both rounded to TF32 in shared
// memory; rows c >= 27 are zero), in mma.m16n8k8 steps: warp w takes the 16 units
// 16 w .. 16 w + 15 (the M tile) and the tile's 16 queries one after the other (N tile n:
// query n's 8 slots, pairs 8 n .. 8 n + 7), 4 k-steps of 8 embedding rows.  Then
// g[n][u] = sum_k w_k relu(h) over the query's slots: each lane holds two slots of two
// units, adds them, and the four lanes of a fragment row add theirs (xor 1, then xor 2).
// The products are TF32 (10-bit mantissas, accumulated in fp32): the result differs from
// the fp32 tiles' by TF32 rounding; the output layer is the same (tile_output, fp32).
//
// Fragment coordinates (PTX ISA, mma.m16n8k8 with .tf32 operands; lane = 4 gid + tid4):
//   A (16 x 8, row): a0 (gid, tid4), a1 (gid + 8, tid4), a2 (gid, tid4 + 4), a3 (gid + 8, tid4 + 4)
//   B (8 x 8, col):  b0 (tid4, gid), b1 (tid4 + 4, gid)
//   C, D (16 x 8):   c0 (gid, 2 tid4), c1 (gid, 2 tid4 + 1), c2 (gid + 8, 2 tid4), c3 (gid + 8, 2 tid4 + 1)
// The functions below give a lane its fragments; the CUDA kernel multiplies them with the
// mma instruction, the CPU (knn_blend_cpu.cpp) with an emulation of these coordinates, so
// the CPU tests check the mapping.
constexpr int kTcSteps = 4;                  // k-steps of 8 embedding rows (27 -> 32)
constexpr int kTcWarps = kTileThreads / 32;  // 4: one 16-unit M tile each
static_assert(kTcWarps * 16 == kTileH && kTcSteps * 8 >= kEmbedDim, "4 warps x 16 units, 4 x 8 embedding rows");

GPA_HD float tc_w(const float* sh, int c, int u) { return c < kEmbedDim ? sh[kTileW1 + c * kTileH + u] : 0.0f; }
GPA_HD float tc_gamma(const float* sh, int c, int p) {
  return c < kEmbedDim ? sh[kTileGamma + c * kTileGammaStride + p] : 0.0f;
}

// A fragment of k-step s for warp w (once per block: the weights are the block's).
GPA_HD void tc_a_fragment(const float* sh, int w, int lane, int s, float (&a)[4]) {
  const int gid = lane >> 2, tid4 = lane & 3, u = 16 * w + gid, c = 8 * s + tid4;
  a[0] = tc_w(sh, c, u);
  a[1] = tc_w(sh, c, u + 8);
  a[2] = tc_w(sh, c + 4, u);
  a[3] = tc_w(sh, c + 4, u + 8);
}

// B fragment of k-step s for query n of the tile.
GPA_HD void tc_b_fragment(const float* sh, int lane, int n, int s, float (&b)[2]) {
  const int gid = lane >> 2, tid4 = lane & 3, p = kTileK * n + gid, c = 8 * s + tid4;
  b[0] = tc_gamma(sh, c, p);
  b[1] = tc_gamma(sh, c + 4, p);
}

// Units u and u + 8 of pair p's table row (0 for an empty slot).
GPA_HD void tc_table(const BlendArgs& a, const float* sh, int p, int u, float& lo, float& hi) {
  const int row = float_bits_to_int(sh[kTileRow + p]);
  const float* t = a.table + static_cast<int64_t>(row < 0 ? 0 : row) * kTileH + u;
#if defined(__CUDA_ARCH__)
  lo = row < 0 ? 0.0f : __ldg(t);
  hi = row < 0 ? 0.0f : __ldg(t + 8);
#else
  lo = row < 0 ? 0.0f : t[0];
  hi = row < 0 ? 0.0f : t[8];
#endif
}

// The table rows of query n at the accumulator's coordinates (C fragment), added to the
// products after the k-steps (so that the products need not wait for these loads: the GPU
// loads the next query's while it multiplies).
GPA_HD void tc_table_fragment(const BlendArgs& a, const float* sh, int w, int lane, int n, float (&t)[4]) {
  const int gid = lane >> 2, tid4 = lane & 3, u = 16 * w + gid, p = kTileK * n + 2 * tid4;
  tc_table(a, sh, p, u, t[0], t[2]);
  tc_table(a, sh, p + 1, u, t[1], t[3]);
}

// w_p relu(h) of a live slot, 0 for an empty one (tile_blend's terms).
GPA_HD float tc_term(const float* sh, int p, float h) {
  return float_bits_to_int(sh[kTileRow + p]) >= 0 ? sh[kTileWeight + p] * relu_f(h) : 0.0f;
}

// A lane's share of g for query n: its two slots' terms, for unit gid (lo) and gid + 8 (hi).
GPA_HD void tc_lane_terms(const float* sh, int lane, int n, const float (&d)[4], float& lo, float& hi) {
  const int p = kTileK * n + 2 * (lane & 3);
  lo = tc_term(sh, p, d[0]) + tc_term(sh, p + 1, d[1]);
  hi = tc_term(sh, p, d[2]) + tc_term(sh, p + 1, d[3]);
}

// g[n][u] from the lanes with tid4 = 0, once the four lanes' shares are summed.
GPA_HD void tc_store_g(float* sh, int w, int lane, int n, float lo, float hi) {
  if ((lane & 3) != 0) return;
  const int u = 16 * w + (lane >> 2);
  sh[kTileG + n * kTileGStride + u] = lo;
  sh[kTileG + n * kTileGStride + u + 8] = hi;
}

#if defined(WITH_CUDA)
// out (B, M, 32) (16-byte aligned).
int launch_knn_blend_tiles_forward_cuda(const BlendArgs& args, int multiprocessors, float* out, void* stream);
// The same with phase B on the tensor cores (TF32; compute capability 8.0 or more).
int launch_knn_blend_tiles_forward_tc_cuda(const BlendArgs& args, int multiprocessors, float* out, void* stream);

// grad_table (rows, H) zeroed by the caller; hidden (B*M, H), total (B*M);
// part_w1 (2 * tile_blocks, 27, H).
int launch_knn_blend_tiles_backward_cuda(const BlendArgs& args, const float* grad_out, int multiprocessors,
                                         float* hidden, float* total, float* grad_table, float* part_w1,
                                         void* stream);
#endif

}  // namespace knn_blend
}  // namespace gpavatar
