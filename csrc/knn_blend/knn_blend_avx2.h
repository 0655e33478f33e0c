// The CPU forward of knn_blend for x86-64 CPUs with AVX2 and FMA (host only;
// included by knn_blend_cpu.cpp, chosen at run time by cpu_has_avx2_fma()).
//
// The arithmetic is knn_blend.h's, arranged for 8-wide vectors:
//
// * The hidden pre-activation h_k = table[row_k] + W1_dir gam_k is summed over the
//   27 embedding terms in the same order (c = 0..26) with fused multiply-adds, as
//   the CUDA kernels' compiled loop does (nvcc contracts h += w * gam into FMAs;
//   the scalar CPU loop is built with -ffp-contract=off and does not).  The H =
//   8 V hidden units (V = 1, 2, 4, 8: H = 8 ... 64; the paper's H = 64, the tiny
//   preset's 16) are V vector accumulators that stay in registers.
// * The embedding of all K neighbours of a query is computed together, eight
//   neighbours per vector: direction() per neighbour (knn_blend.h), then sin and
//   cos of the three components by polynomials (|r_d| <= 1 for a unit vector, where
//   the degree-13/12 Taylor polynomials are exact to float rounding: the first
//   omitted terms are below 1/15! and 1/14!), and the double-angle recursion of
//   harmonic_embedding().  The scalar loop calls sinf/cosf instead (both within
//   a few float ulps of each other; the tests compare against the float64 oracle).
// * The output projection W2 g + b2 sum_k w_k runs over j = 0..H-1 then adds the
//   bias term, as project_output_t() does, with FMAs.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPA_KNN_BLEND_AVX2 1
#include <immintrin.h>

#include "knn_blend/knn_blend.h"

namespace gpavatar {
namespace knn_blend {
namespace avx2 {

#define GPA_AVX2_FMA __attribute__((target("avx2,fma")))

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// sin x and cos x for |x| <= 1 (Taylor polynomials in Horner form; NaN stays NaN).
GPA_AVX2_FMA inline __m256 sin_small(__m256 x) {
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(1.0f / 6227020800.0f);  // 1/13!
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 39916800.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f / 362880.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 5040.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 6.0f));
  p = _mm256_mul_ps(p, x2);
  return _mm256_fmadd_ps(p, x, x);
}

GPA_AVX2_FMA inline __m256 cos_small(__m256 x) {
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(1.0f / 479001600.0f);  // 1/12!
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3628800.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f / 40320.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-0.5f));
  return _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.0f));
}

// torch.relu on 8 lanes: max(0, x) returns its second operand when either is NaN,
// so NaN stays NaN (and -0 stays -0, as relu_f gives).
GPA_AVX2_FMA inline __m256 relu8(__m256 x) { return _mm256_max_ps(_mm256_setzero_ps(), x); }

// Hidden widths the vector loop is compiled for (H = 8 V).
inline bool vector_width_supported(int H) { return H == 8 || H == 16 || H == 32 || H == 64; }

// One query's neighbour terms: blend weights w[k], table rows, and the embeddings of all
// K neighbours, gam[c][k] (eight neighbours per vector).
struct QueryTerms {
  alignas(32) float gam[kEmbedDim][kMaxK];
  alignas(32) float rx[kMaxK], ry[kMaxK], rz[kMaxK];
  float w[kMaxK];
  const float* rows[kMaxK];
  float total;
};

template <int H>
GPA_AVX2_FMA inline void query_terms(const BlendArgs& a, int64_t qi, QueryTerms& t) {
  const int64_t b = qi / a.M;
  const int K = a.K, KP = (a.K + 7) & ~7;
  t.total = neighbor_weights(a, qi, t.w);
  const float* q = a.queries + qi * 3;
  for (int k = 0; k < K; ++k) {
    const int64_t i = a.idx[qi * K + k];  // in [0, P): checked by the caller
    const float* p = a.points + (b * a.P + i) * 3;
    float r[3];
    direction(q[0], q[1], q[2], p[0], p[1], p[2], r);
    t.rx[k] = r[0];
    t.ry[k] = r[1];
    t.rz[k] = r[2];
    t.rows[k] = a.table + table_row(b, i, a.P, a.per_batch_table) * H;
  }
  for (int k = K; k < KP; ++k) t.rx[k] = t.ry[k] = t.rz[k] = 0.0f;
  for (int kb = 0; kb < KP; kb += 8) {
    const float* axes[3] = {t.rx, t.ry, t.rz};
    for (int d = 0; d < 3; ++d) {
      const __m256 x = _mm256_load_ps(axes[d] + kb);
      __m256 s = sin_small(x), c = cos_small(x);
      for (int j = 0; j < kNumFrequencies; ++j) {
        _mm256_store_ps(&t.gam[d * kNumFrequencies + j][kb], s);
        _mm256_store_ps(&t.gam[3 * kNumFrequencies + d * kNumFrequencies + j][kb], c);
        const __m256 s2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), s), c);
        c = _mm256_mul_ps(_mm256_sub_ps(c, s), _mm256_add_ps(c, s));
        s = s2;
      }
      _mm256_store_ps(&t.gam[6 * kNumFrequencies + d][kb], x);
    }
  }
}

// h_k = table[row_k] + W1_dir gam_k (c = 0..26 in order, FMAs) into V vectors.
template <int V>
GPA_AVX2_FMA inline void hidden_vectors(const BlendArgs& a, const QueryTerms& t, int k, __m256 (&h)[V]) {
  constexpr int H = 8 * V;
  const float* row = t.rows[k];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) h[v] = _mm256_loadu_ps(row + 8 * v);
#pragma GCC unroll 27
  for (int c = 0; c < kEmbedDim; ++c) {
    const __m256 gc = _mm256_broadcast_ss(&t.gam[c][k]);
    const float* w = a.w1_dir_t + c * H;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) h[v] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8 * v), gc, h[v]);
  }
}

// out[qi] for queries [begin, end); H = 8 V, any C, any K <= kMaxK.
template <int V>
GPA_AVX2_FMA inline void forward_range(const BlendArgs& a, int64_t begin, int64_t end, float* o) {
  constexpr int H = 8 * V;
  static_assert(V >= 1 && V <= 8, "H = 8 V with V in 1..8");
  QueryTerms t;
  alignas(32) float g_mem[H];
  const int K = a.K;
  for (int64_t qi = begin; qi < end; ++qi) {
    query_terms<H>(a, qi, t);
    const float total = t.total;
    __m256 g[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) g[v] = _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) {
      __m256 h[V];
      hidden_vectors<V>(a, t, k, h);
      const __m256 wk = _mm256_set1_ps(t.w[k]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) g[v] = _mm256_fmadd_ps(wk, relu8(h[v]), g[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm256_store_ps(g_mem + 8 * v, g[v]);
    float* out = o + qi * a.C;
    const __m256 tot = _mm256_set1_ps(total);
    int o0 = 0;
    for (; o0 + 32 <= a.C; o0 += 32) {  // four output vectors at a time
      __m256 acc[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[u] = _mm256_setzero_ps();
      for (int j = 0; j < H; ++j) {
        const __m256 gj = _mm256_broadcast_ss(g_mem + j);
        const float* w = a.w2_t + j * a.C + o0;
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8 * u), gj, acc[u]);
      }
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
        _mm256_storeu_ps(out + o0 + 8 * u,
                         _mm256_fmadd_ps(_mm256_loadu_ps(a.b2 + o0 + 8 * u), tot, acc[u]));
    }
    for (; o0 + 8 <= a.C; o0 += 8) {  // then one output vector at a time
      __m256 acc = _mm256_setzero_ps();
      for (int j = 0; j < H; ++j)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.w2_t + j * a.C + o0), _mm256_broadcast_ss(g_mem + j), acc);
      _mm256_storeu_ps(out + o0, _mm256_fmadd_ps(_mm256_loadu_ps(a.b2 + o0), tot, acc));
    }
    for (; o0 < a.C; ++o0) {  // the rest one output at a time, same order
      float acc = 0.0f;
      for (int j = 0; j < H; ++j) acc = __builtin_fmaf(a.w2_t[j * a.C + o0], g_mem[j], acc);
      out[o0] = __builtin_fmaf(a.b2[o0], total, acc);
    }
  }
}

// The backward of knn_blend.h's backward_range for queries [begin, end), into one
// thread's buffer (table rows, H) | (27, H) | (C, H) | (C): per query, v = W2^T grad_out,
// delta_k = w_k v [h_k > 0] (the mask passes at NaN, as relu_passes), grad_table[row_k] +=
// delta_k, then grad_w1_dir[c] += sum_k delta_k gam_k[c] (the K neighbours summed before one
// update of each row), grad_w2[o] += grad_out[o] g, grad_b2[o] += grad_out[o] sum_k w_k.
template <int V>
GPA_AVX2_FMA inline void backward_range(const BlendArgs& a, const float* grad_out, int64_t begin, int64_t end,
                                        int64_t table_size, float* buf) {
  constexpr int H = 8 * V;
  float* g_table = buf;
  float* g_w1t = g_table + table_size;
  float* g_w2 = g_w1t + kEmbedDim * H;
  float* g_b2 = g_w2 + a.C * H;
  QueryTerms t;
  alignas(32) float delta[kMaxK][H];
  const int K = a.K;
  for (int64_t qi = begin; qi < end; ++qi) {
    const float* gout = grad_out + qi * a.C;
    query_terms<H>(a, qi, t);
    __m256 v[V], g[V];
#pragma GCC unroll 8
    for (int u = 0; u < V; ++u) v[u] = g[u] = _mm256_setzero_ps();
    for (int o = 0; o < a.C; ++o) {
      const __m256 go = _mm256_set1_ps(gout[o]);
      const float* w = a.w2 + o * H;
#pragma GCC unroll 8
      for (int u = 0; u < V; ++u) v[u] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8 * u), go, v[u]);
    }
    for (int k = 0; k < K; ++k) {
      __m256 h[V];
      hidden_vectors<V>(a, t, k, h);
      const __m256 wk = _mm256_set1_ps(t.w[k]);
      float* gt = g_table + (t.rows[k] - a.table);
#pragma GCC unroll 8
      for (int u = 0; u < V; ++u) {
        g[u] = _mm256_fmadd_ps(wk, relu8(h[u]), g[u]);
        const __m256 passes = _mm256_cmp_ps(h[u], _mm256_setzero_ps(), _CMP_NLE_UQ);
        const __m256 d = _mm256_and_ps(passes, _mm256_mul_ps(wk, v[u]));
        _mm256_store_ps(delta[k] + 8 * u, d);
        _mm256_storeu_ps(gt + 8 * u, _mm256_add_ps(_mm256_loadu_ps(gt + 8 * u), d));
      }
    }
    for (int c = 0; c < kEmbedDim; ++c) {
      __m256 acc[V];
#pragma GCC unroll 8
      for (int u = 0; u < V; ++u) acc[u] = _mm256_setzero_ps();
      for (int k = 0; k < K; ++k) {
        const __m256 gc = _mm256_broadcast_ss(&t.gam[c][k]);
#pragma GCC unroll 8
        for (int u = 0; u < V; ++u) acc[u] = _mm256_fmadd_ps(_mm256_load_ps(delta[k] + 8 * u), gc, acc[u]);
      }
      float* gw = g_w1t + c * H;
#pragma GCC unroll 8
      for (int u = 0; u < V; ++u) _mm256_storeu_ps(gw + 8 * u, _mm256_add_ps(_mm256_loadu_ps(gw + 8 * u), acc[u]));
    }
    for (int o = 0; o < a.C; ++o) {
      const __m256 go = _mm256_set1_ps(gout[o]);
      float* gw = g_w2 + o * H;
#pragma GCC unroll 8
      for (int u = 0; u < V; ++u) _mm256_storeu_ps(gw + 8 * u, _mm256_fmadd_ps(go, g[u], _mm256_loadu_ps(gw + 8 * u)));
      g_b2[o] += gout[o] * t.total;
    }
  }
}

#undef GPA_AVX2_FMA

}  // namespace avx2
}  // namespace knn_blend
}  // namespace gpavatar
#endif
