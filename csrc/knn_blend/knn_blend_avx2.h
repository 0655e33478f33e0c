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
// * The loops over hidden units (hidden_vectors, forward_range, backward_range) are
//   written once in knn_blend_simd.inc and included twice: 8 lanes here (namespace
//   avx2) and 16 lanes with AVX-512F (namespace avx512, H = 16, 32, 64), each lane
//   doing the same operations in the same order, so both give the same bits.
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

// hidden_vectors, forward_range and backward_range: knn_blend_simd.inc, 8 lanes.
#define GPA_SIMD_TARGET GPA_AVX2_FMA
#define GPA_VEC __m256
#define GPA_LANES 8
#define GPA_LOADU(p) _mm256_loadu_ps(p)
#define GPA_LOAD(p) _mm256_load_ps(p)
#define GPA_STOREU(p, v) _mm256_storeu_ps(p, v)
#define GPA_STORE(p, v) _mm256_store_ps(p, v)
#define GPA_SET1(x) _mm256_set1_ps(x)
#define GPA_ZERO() _mm256_setzero_ps()
#define GPA_FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define GPA_ADD(a, b) _mm256_add_ps(a, b)
#define GPA_MUL(a, b) _mm256_mul_ps(a, b)
#define GPA_RELU(x) relu8(x)
#define GPA_WHERE_PASSES(h, x) _mm256_and_ps(_mm256_cmp_ps(h, _mm256_setzero_ps(), _CMP_NLE_UQ), x)
#include "knn_blend/knn_blend_simd.inc"
#undef GPA_AVX2_FMA

}  // namespace avx2

// The same loops 16 lanes at a time (AVX-512F): H in {16, 32, 64}; the same bits as avx2.
namespace avx512 {

#define GPA_AVX512_FMA __attribute__((target("avx512f,avx2,fma")))

inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && avx2::cpu_has_avx2_fma();
  return ok;
}

inline bool vector_width_supported(int H) { return H == 16 || H == 32 || H == 64; }

GPA_AVX512_FMA inline __m512 relu16(__m512 x) { return _mm512_max_ps(_mm512_setzero_ps(), x); }

#define GPA_SIMD_TARGET GPA_AVX512_FMA
#define GPA_VEC __m512
#define GPA_LANES 16
#define GPA_LOADU(p) _mm512_loadu_ps(p)
#define GPA_LOAD(p) _mm512_load_ps(p)
#define GPA_STOREU(p, v) _mm512_storeu_ps(p, v)
#define GPA_STORE(p, v) _mm512_store_ps(p, v)
#define GPA_SET1(x) _mm512_set1_ps(x)
#define GPA_ZERO() _mm512_setzero_ps()
#define GPA_FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define GPA_ADD(a, b) _mm512_add_ps(a, b)
#define GPA_MUL(a, b) _mm512_mul_ps(a, b)
#define GPA_RELU(x) relu16(x)
#define GPA_WHERE_PASSES(h, x) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_NLE_UQ), x)
#include "knn_blend/knn_blend_simd.inc"
#undef GPA_AVX512_FMA

}  // namespace avx512
}  // namespace knn_blend
}  // namespace gpavatar
#endif
