// knn_blend: the fused point-expression-field op (SPEC section 5).
//
// For query x with neighbours p_{i_k} (from `knn`) at squared distances d_k:
//   r_k   = (x - p_{i_k}) / max(|x - p_{i_k}|, 1e-12)          (zero vector -> 0)
//   gam_k = [sin(r_d f_j) for d, j] (12), [cos(r_d f_j)] (12), r (3);  f = 1, 2, 4, 8
//   h_k   = table[row(i_k)] + W1_dir gam_k                          (H)
//           where table = point_features W1_feat^T + b1 is computed once per call
//   u_k   = 1 / (d_k + eps)
//   w_k   = u_k / sum_k' u_k'       ("neighbors")
//         = u_k / weight_sum[b, k]  ("queries": sum over all queries of batch b)
//   g     = sum_k w_k relu(h_k)                                     (H)
//   out   = W2 g + b2 sum_k w_k                                     (C)
//
// Shapes:
//   queries (B, M, 3), points (B, P, 3), dist2 / idx (B, M, K) from knn,
//   table (P or B*P, H), w1_dir (H, 27), w2 (C, H), b2 (C), weight_sum (B, K) or none,
//   out (B, M, C).
// Backward (to table, w1_dir, w2, b2) with delta_k = w_k (W2^T grad_out) * [h_k > 0]:
//   grad_table[row(i_k)] += delta_k,  grad_w1_dir += delta_k gam_k^T,
//   grad_w2 += grad_out g^T,          grad_b2 += grad_out sum_k w_k.
//
// Everything below is shared by the CPU loop and the CUDA kernels.
#pragma once

#include <math.h>

#include "common.h"

namespace gpavatar {
namespace knn_blend {

constexpr int kNumFrequencies = 4;
constexpr int kEmbedDim = 6 * kNumFrequencies + 3;  // 27
constexpr int kMaxK = 32;

// Unit direction from point p to query q (F.normalize semantics: divide by
// max(norm, 1e-12), so coincident points give the zero vector).
GPA_HD void direction(float qx, float qy, float qz, float px, float py, float pz, float r[3]) {
  const float dx = qx - px, dy = qy - py, dz = qz - pz;
  const float norm = sqrtf(sum_of_products3(dx, dx, dy, dy, dz, dz));
  const float denom = clamp_min_f(norm, 1e-12f);
  r[0] = dx / denom;
  r[1] = dy / denom;
  r[2] = dz / denom;
}

// gamma(r): [sin(r_d * 2^j) for d in xyz for j], then cos likewise, then r.
// One sin/cos pair per axis; the higher frequencies come from the double-angle
// formulas sin 2a = 2 sin a cos a, cos 2a = (cos a - sin a)(cos a + sin a)
// (|error| < 1e-6 against sinf/cosf of 2^j r_d for |r_d| <= 1; a quarter of
// the transcendental calls, which dominate the CPU kernel otherwise).
GPA_HD void harmonic_embedding(const float r[3], float gamma[kEmbedDim]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < 3; ++d) {
    float s = sinf(r[d]), c = cosf(r[d]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < kNumFrequencies; ++j) {
      gamma[d * kNumFrequencies + j] = s;
      gamma[3 * kNumFrequencies + d * kNumFrequencies + j] = c;
      const float s2 = 2.0f * s * c;
      c = (c - s) * (c + s);
      s = s2;
    }
    gamma[6 * kNumFrequencies + d] = r[d];
  }
}

// Unnormalized inverse-distance weight.
GPA_HD float inverse_distance(float dist2, float eps) { return 1.0f / (dist2 + eps); }

// One hidden unit: h_j = table_row[j] + sum_c w1_dir_t[c * H + j] * gamma[c]
// (w1_dir_t: (27, H)), summed in the order c = 0..26.
GPA_HD float hidden_unit(const float* table_row, const float* w1_dir_t,
                         const float gamma[kEmbedDim], int H, int j) {
  float h = table_row[j];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int c = 0; c < kEmbedDim; ++c) h += w1_dir_t[c * H + j] * gamma[c];
  return h;
}

// All hidden units at once, in the same summation order as hidden_unit (the
// loop over c is outside so the CPU vectorizes over j).
GPA_HD void hidden_preactivation(const float* table_row, const float* w1_dir_t,
                                 const float gamma[kEmbedDim], int H, float* h) {
  for (int j = 0; j < H; ++j) h[j] = table_row[j];
  for (int c = 0; c < kEmbedDim; ++c) {
    const float gc = gamma[c];
    const float* w = w1_dir_t + c * H;
    for (int j = 0; j < H; ++j) h[j] += w[j] * gc;
  }
}

// g[j] += weight * relu(h[j])   (relu_f: NaN stays NaN, like torch.relu)
GPA_HD void accumulate_relu(const float* h, float weight, int H, float* g) {
  for (int j = 0; j < H; ++j) g[j] += weight * relu_f(h[j]);
}

// out[o] = b2[o] * weight_total + sum_j w2[o * H + j] * g[j]
GPA_HD void project_output(const float* w2, const float* b2, const float* g, float weight_total,
                           int H, int C, float* out) {
  for (int o = 0; o < C; ++o) {
    float acc = 0.0f;
    const float* w = w2 + o * H;
    for (int j = 0; j < H; ++j) acc += w[j] * g[j];
    out[o] = acc + b2[o] * weight_total;
  }
}

// project_output with w2 transposed (w2_t: (H, C)): the same sums in the same
// order (j = 0..H-1 for every o, then the bias term), with the loop over o
// inside so the CPU vectorizes over outputs instead of running one serial
// H-long dependency chain per output.
GPA_HD void project_output_t(const float* w2_t, const float* b2, const float* g, float weight_total,
                             int H, int C, float* out) {
  for (int o = 0; o < C; ++o) out[o] = 0.0f;
  for (int j = 0; j < H; ++j) {
    const float gj = g[j];
    const float* w = w2_t + j * C;
    for (int o = 0; o < C; ++o) out[o] += w[o] * gj;
  }
  for (int o = 0; o < C; ++o) out[o] = out[o] + b2[o] * weight_total;
}

// v[j] = sum_o w2[o * H + j] * grad_out[o]   (the gradient reaching g)
GPA_HD void hidden_gradient(const float* w2, const float* grad_out, int H, int C, float* v) {
  for (int j = 0; j < H; ++j) v[j] = 0.0f;
  for (int o = 0; o < C; ++o) {
    const float go = grad_out[o];
    const float* w = w2 + o * H;
    for (int j = 0; j < H; ++j) v[j] += w[j] * go;
  }
}

// delta[j] = weight * v[j] * [h[j] > 0]   (the gradient reaching h_k; like torch's
// relu backward it also passes where h[j] is NaN)
GPA_HD void preactivation_gradient(const float* h, const float* v, float weight, int H,
                                   float* delta) {
  for (int j = 0; j < H; ++j) delta[j] = relu_passes(h[j]) ? weight * v[j] : 0.0f;
}

// Row of `table` that neighbour i of batch element b reads.
GPA_HD int64_t table_row(int64_t b, int64_t i, int64_t P, bool per_batch) {
  return per_batch ? b * P + i : i;
}

// Raw views of one call's inputs (all contiguous float32 / int64).
struct BlendArgs {
  const float* queries;     // (B, M, 3)
  const float* points;      // (B, P, 3)
  const float* dist2;       // (B, M, K)
  const int64_t* idx;       // (B, M, K)
  const float* table;       // (P or B*P, H)
  const float* w1_dir_t;    // (27, H)
  const float* w2;          // (C, H)
  const float* w2_t;        // (H, C) the same, transposed (CPU forward; may be nullptr)
  const float* b2;          // (C)
  const float* weight_sum;  // (B, K) or nullptr for per-query normalization
  int64_t B, M, P;
  int K, H, C;
  bool per_batch_table;
  float eps;
  int cuda_variant = 0;     // how the CUDA kernels are compiled for H = 64, C = 32 (knn_blend.cu)
};

constexpr int kVariantDefault = 0, kVariantOccupancy = 1, kVariantGeneric = 2;

// Blend weights w[0..K) of query qi = b * M + m; returns sum_k w_k.
GPA_HD float neighbor_weights(const BlendArgs& a, int64_t qi, float* w) {
  const int64_t b = qi / a.M;
  const float* d = a.dist2 + qi * a.K;
  float total = 0.0f;
  if (a.weight_sum != nullptr) {
    for (int k = 0; k < a.K; ++k) {
      w[k] = inverse_distance(d[k], a.eps) / a.weight_sum[b * a.K + k];
      total += w[k];
    }
  } else {
    float sum = 0.0f;
    for (int k = 0; k < a.K; ++k) sum += (w[k] = inverse_distance(d[k], a.eps));
    for (int k = 0; k < a.K; ++k) total += (w[k] /= sum);
  }
  return total;
}

// gamma of neighbour k of query qi; returns its table row, or nullptr when the
// index is out of range (then the neighbour contributes nothing; never read).
GPA_HD const float* neighbor_embedding(const BlendArgs& a, int64_t qi, int k, float* gamma) {
  const int64_t b = qi / a.M;
  const int64_t i = a.idx[qi * a.K + k];
  if (i < 0 || i >= a.P) return nullptr;
  const float* q = a.queries + qi * 3;
  const float* p = a.points + (b * a.P + i) * 3;
  float r[3];
  direction(q[0], q[1], q[2], p[0], p[1], p[2], r);
  harmonic_embedding(r, gamma);
  return a.table + table_row(b, i, a.P, a.per_batch_table) * a.H;
}

// --- The gather backward (GPAVATAR_BLEND_BACKWARD=gather) --------------------------
// The (query, neighbour) pairs, pair = qi * K + k, are grouped by the table row they
// read (a stable sort: perm), and cut into chunks of at most kGatherChunk pairs of
// one row.  A chunk's grad_table share is summed over its pairs in order, with
// nothing stored per pair and no atomics:
//   delta_j = w_k v[qi, j] [h_j > 0]          (v = grad_out W2: (B * M, H))
//   part_table[chunk, j] = sum over the chunk's pairs of delta_j
//   part_w1[..., c, j]  += delta_j gamma_c
// and grad_table[row] is the ordered sum of its chunks' shares.
constexpr int64_t kGatherChunk = 128;

// w_k and gamma of pair `pair`; returns its table row (nullptr for an index out of
// range, which contributes nothing).
GPA_HD const float* pair_terms(const BlendArgs& a, int64_t pair, float* gamma, float& weight, int64_t& qi) {
  qi = pair / a.K;
  const int k = static_cast<int>(pair - qi * a.K);
  float w[kMaxK];
  neighbor_weights(a, qi, w);
  weight = w[k];
  return neighbor_embedding(a, qi, k, gamma);
}

// The row (chunk_start[row] <= chunk < chunk_start[row + 1]) of a chunk: binary search
// over chunk_start[0 .. rows].
GPA_HD int64_t chunk_row(const int64_t* chunk_start, int64_t rows, int64_t chunk) {
  int64_t lo = 0, hi = rows;  // chunk_start[lo] <= chunk < chunk_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_start[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

#if defined(WITH_CUDA)
// out: (B, M, C).  Returns a CUDA error code (0 on success).
int launch_knn_blend_forward_cuda(const BlendArgs& args, float* out, void* stream);

// For queries [m_begin, m_end) of every batch element (a chunk of n = m_end - m_begin):
//   hidden (B, n, H)          g of every query
//   weight_total (B, n)       sum_k w_k
//   delta (B, n, K, H)        gradient reaching h_k
//   gamma (B, n, K, 27)       harmonic embedding of every neighbour
// grad_out: (B, M, C).  The caller reduces these with matrix products.
int launch_knn_blend_backward_cuda(const BlendArgs& args, const float* grad_out, int64_t m_begin,
                                   int64_t m_end, float* hidden, float* weight_total,
                                   float* delta, float* gamma, void* stream);

// The gather backward's kernels (see above): hidden (B * M, H) and total (B * M) of every
// query (for grad_w2 / grad_b2); the chunks' shares part_table (max_chunks, H) and
// part_w1 (gather_blocks(max_chunks), 27, H); grad_table (rows, H) from part_table.
int launch_knn_blend_hidden_cuda(const BlendArgs& args, float* hidden, float* total, void* stream);
int64_t gather_blocks(int64_t max_chunks);
int launch_knn_blend_gather_cuda(const BlendArgs& args, const float* v, const int64_t* perm,
                                 const int64_t* row_start, const int64_t* chunk_start, int64_t rows,
                                 int64_t max_chunks, float* part_table, float* part_w1, void* stream);
int launch_knn_blend_gather_reduce_cuda(const int64_t* chunk_start, int64_t rows, int H,
                                        const float* part_table, float* grad_table, void* stream);
#endif

}  // namespace knn_blend
}  // namespace gpavatar
