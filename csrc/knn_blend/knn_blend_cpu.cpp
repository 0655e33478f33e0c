// knn_blend on the CPU: one query at a time, parallel over queries, using the
// arithmetic of knn_blend.h.  The backward keeps one set of gradient buffers
// per thread and sums them at the end (deterministic for a fixed thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "knn_blend/knn_blend.h"
#include "knn_blend/knn_blend_avx2.h"
#include "knn_blend/knn_blend_tiles.h"
#include "ops.h"

namespace gpavatar {
namespace knn_blend {

void check_inputs(const at::Tensor& queries, const at::Tensor& points, const at::Tensor& dist2,
                  const at::Tensor& idx, const at::Tensor& table, const at::Tensor& w1_dir,
                  const at::Tensor& w2, const at::Tensor& b2,
                  const std::optional<at::Tensor>& weight_sum, double eps) {
  check_float_tensor(queries, "queries", 3, "(B, M, 3)");
  check_float_tensor(points, "points", 3, "(B, P, 3)");
  check_float_tensor(dist2, "dist2", 3, "(B, M, K)");
  check_float_tensor(table, "table", 2, "(P or B*P, H)");
  check_float_tensor(w1_dir, "w1_dir", 2, "(H, 27)");
  check_float_tensor(w2, "w2", 2, "(C, H)");
  check_float_tensor(b2, "b2", 1, "(C,)");
  TORCH_CHECK_VALUE(idx.dim() == 3, msg("idx must have shape (B, M, K), got ", shape_of(idx)));
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, msg("idx must be int64, got ", idx.scalar_type()));
  const int64_t B = queries.size(0), M = queries.size(1), P = points.size(1);
  const int64_t K = dist2.size(2), H = table.size(1), C = w2.size(0);
  TORCH_CHECK_VALUE(queries.size(2) == 3, msg("queries must have shape (B, M, 3), got ",
                    shape_of(queries)));
  TORCH_CHECK_VALUE(points.size(0) == B && points.size(2) == 3, msg("points must have shape (", B,
                    ", P, 3), got ", shape_of(points)));
  TORCH_CHECK_VALUE(dist2.size(0) == B && dist2.size(1) == M, msg("dist2 must have shape (", B, ", ",
                    M, ", K), got ", shape_of(dist2)));
  TORCH_CHECK_VALUE(idx.sizes() == dist2.sizes(), msg("idx must have the shape of dist2 ",
                    shape_of(dist2), ", got ", shape_of(idx)));
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK && K <= P, msg("K must be in [1, min(P, ", kMaxK,
                    ")], got ", K));
  TORCH_CHECK_VALUE(table.size(0) == P || table.size(0) == B * P, msg("table must have shape (",
                    P, " or ", B * P, ", H), got ", shape_of(table)));
  TORCH_CHECK_VALUE(w1_dir.size(0) == H && w1_dir.size(1) == kEmbedDim, msg("w1_dir must have shape (", H, ", ", kEmbedDim, "), got ", shape_of(w1_dir)));
  TORCH_CHECK_VALUE(w2.size(1) == H, msg("w2 must have shape (C, ", H, "), got ", shape_of(w2)));
  TORCH_CHECK_VALUE(b2.size(0) == C, msg("b2 must have shape (", C, ",), got ", shape_of(b2)));
  if (weight_sum.has_value()) {
    check_float_tensor(*weight_sum, "weight_sum", 2, "(B, K)");
    TORCH_CHECK_VALUE(weight_sum->size(0) == B && weight_sum->size(1) == K, msg("weight_sum must have shape (", B, ", ", K, "), got ",
                      shape_of(*weight_sum)));
    check_same_device(queries, "queries", *weight_sum, "weight_sum");
  }
  TORCH_CHECK_VALUE(eps > 0.0, msg("eps must be > 0, got ", eps));
  const at::Tensor* others[] = {&points, &dist2, &idx, &table, &w1_dir, &w2, &b2};
  const char* names[] = {"points", "dist2", "idx", "table", "w1_dir", "w2", "b2"};
  for (int t = 0; t < 7; ++t) check_same_device(queries, "queries", *others[t], names[t]);
}

Prepared prepare(const at::Tensor& queries, const at::Tensor& points, const at::Tensor& dist2,
                 const at::Tensor& idx, const at::Tensor& table, const at::Tensor& w1_dir,
                 const at::Tensor& w2, const at::Tensor& b2,
                 const std::optional<at::Tensor>& weight_sum, double eps) {
  const at::Tensor b2_or_zeros = b2.defined() ? b2 : at::zeros({w2.size(0)}, w2.options());
  check_inputs(queries, points, dist2, idx, table, w1_dir, w2, b2_or_zeros, weight_sum, eps);
  Prepared p;
  p.queries = queries.contiguous();
  p.points = points.contiguous();
  p.dist2 = dist2.contiguous();
  p.idx = idx.contiguous();
  p.table = table.contiguous();
  p.w1_dir_t = w1_dir.t().contiguous();
  p.w2 = w2.contiguous();
  p.b2 = b2_or_zeros.contiguous();
  if (weight_sum.has_value()) p.weight_sum = weight_sum->contiguous();
  BlendArgs& a = p.args;
  a.queries = p.queries.data_ptr<float>();
  a.points = p.points.data_ptr<float>();
  a.dist2 = p.dist2.data_ptr<float>();
  a.idx = p.idx.data_ptr<int64_t>();
  a.table = p.table.data_ptr<float>();
  a.w1_dir_t = p.w1_dir_t.data_ptr<float>();
  a.w2 = p.w2.data_ptr<float>();
  a.w2_t = nullptr;  // set by the CPU forward, the only user
  a.b2 = p.b2.data_ptr<float>();
  a.weight_sum = p.weight_sum.defined() ? p.weight_sum.data_ptr<float>() : nullptr;
  a.B = queries.size(0);
  a.M = queries.size(1);
  a.P = points.size(1);
  a.K = static_cast<int>(dist2.size(2));
  a.H = static_cast<int>(table.size(1));
  a.C = static_cast<int>(w2.size(0));
  a.per_batch_table = table.size(0) != a.P;
  a.eps = static_cast<float>(eps);
  return p;
}

void check_grad_out(const at::Tensor& grad_out, const Prepared& p) {
  check_float_tensor(grad_out, "grad_out", 3, "(B, M, C)");
  TORCH_CHECK_VALUE(grad_out.size(0) == p.args.B && grad_out.size(1) == p.args.M &&
                        grad_out.size(2) == p.args.C, msg("grad_out must have shape (", p.args.B, ", ", p.args.M, ", ", p.args.C,
                    "), got ", shape_of(grad_out)));
  check_same_device(p.queries, "queries", grad_out, "grad_out");
}

GatherPlan make_gather_plan(const Prepared& p, const at::Tensor& grad_out) {
  const BlendArgs& a = p.args;
  GatherPlan plan;
  plan.rows = p.table.size(0);
  const int64_t n = a.B * a.M * a.K;
  at::Tensor keys = p.idx.reshape({a.B, a.M * a.K});
  const at::Tensor valid = keys.ge(0).logical_and(keys.lt(a.P));
  if (a.per_batch_table) keys = keys + at::arange(a.B, keys.options()).mul_(a.P).unsqueeze(1);
  keys = at::where(valid, keys, at::full({}, plan.rows, keys.options())).reshape({n});
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  plan.perm = std::get<1>(sorted).contiguous();
  plan.row_start = at::searchsorted(std::get<0>(sorted), at::arange(plan.rows + 1, keys.options())).contiguous();
  const at::Tensor counts = plan.row_start.narrow(0, 1, plan.rows) - plan.row_start.narrow(0, 0, plan.rows);
  const at::Tensor chunks = counts.add(kGatherChunk - 1).div(kGatherChunk, "floor");
  plan.chunk_start = at::cat({at::zeros({1}, keys.options()), chunks.cumsum(0)}).contiguous();
  plan.max_chunks = plan.rows + (n + kGatherChunk - 1) / kGatherChunk;
  plan.v = at::mm(grad_out.reshape({a.B * a.M, a.C}), p.w2).contiguous();  // (B*M, H)
  return plan;
}

ForwardMethod blend_forward_method(bool on_cuda) {
  const std::string name = env_choice("GPAVATAR_BLEND_FORWARD", {"auto", "queries", "tiles", "tiles_tf32"}, "auto");
  if (name == "tiles_tf32") return ForwardMethod::kTilesTf32;
  return name == "tiles" || (name == "auto" && on_cuda) ? ForwardMethod::kTiles : ForwardMethod::kQueries;
}

BackwardMethod blend_backward_method(bool on_cuda) {
  const std::string name = env_choice("GPAVATAR_BLEND_BACKWARD", {"auto", "buffers", "gather", "tiles"}, "auto");
  if (name == "auto") {
    if (!on_cuda) return BackwardMethod::kBuffers;
    // The tiles' grad_table atomics make the sums' order vary between runs; the gather
    // backward has none and is what torch.use_deterministic_algorithms(True) gets.
    return at::globalContext().deterministicAlgorithms() ? BackwardMethod::kGather : BackwardMethod::kTiles;
  }
  return name == "gather" ? BackwardMethod::kGather
         : name == "tiles" ? BackwardMethod::kTiles
                           : BackwardMethod::kBuffers;
}

namespace {

// GPAVATAR_BLEND_CPU_VARIANT = auto (default: avx512 where the CPU has AVX-512F, AVX2 and FMA
// and H is 16, 32 or 64; else avx2 where it has AVX2 and FMA and H is 8, 16, 32 or 64; else
// scalar) | avx512 | avx2 | scalar: which CPU loops run, forward and backward (tests run them
// all; avx512 and avx2 give the same bits).
enum class Loops { kScalar, kAvx2, kAvx512 };

Loops cpu_loops(int H) {
  const std::string name = env_choice("GPAVATAR_BLEND_CPU_VARIANT", {"auto", "avx512", "avx2", "scalar"}, "auto");
#if defined(GPA_KNN_BLEND_AVX2)
  const bool avx2 = avx2::cpu_has_avx2_fma() && avx2::vector_width_supported(H);
  const bool avx512 = avx512::cpu_has_avx512() && avx512::vector_width_supported(H);
  TORCH_CHECK_VALUE(name != "avx2" || avx2,
                    msg("GPAVATAR_BLEND_CPU_VARIANT=avx2 needs a CPU with AVX2 and FMA and H in {8, 16, 32, 64}, got H = ",
                        H));
  TORCH_CHECK_VALUE(name != "avx512" || avx512,
                    msg("GPAVATAR_BLEND_CPU_VARIANT=avx512 needs a CPU with AVX-512F, AVX2 and FMA and H in "
                        "{16, 32, 64}, got H = ", H));
  if (name == "scalar") return Loops::kScalar;
  if (name == "avx512" || (name == "auto" && avx512)) return Loops::kAvx512;
  return avx2 ? Loops::kAvx2 : Loops::kScalar;
#else
  TORCH_CHECK_VALUE(name != "avx2" && name != "avx512",
                    msg("GPAVATAR_BLEND_CPU_VARIANT=", name, " needs an x86-64 build"));
  (void)H;
  return Loops::kScalar;
#endif
}

void check_indices(const at::Tensor& idx, int64_t P) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < P, msg("idx must hold indices in [0, P = ", P, ")"));
}

// The per-query loops, compiled twice (AVX2 and baseline x86-64, chosen at load
// time) so the H-wide loops of knn_blend.h vectorize 8 floats at a time where
// the CPU allows.  -ffp-contract=off keeps mul and add separate in both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GPA_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GPA_CPU_CLONES
#endif

// Per-query vectors of the blend (n of width H): on the stack when the hidden width is a
// compile-time constant FixedH (the compiler then keeps the H-wide accumulators in vector
// registers across the 27 direction terms), on the heap otherwise (FixedH = 0).
template <int FixedH, int N>
struct HiddenVectors {
  float data[N * FixedH];
  explicit HiddenVectors(int) {}
  float* at(int i) { return data + i * FixedH; }
};
template <int N>
struct HiddenVectors<0, N> {
  std::vector<float> data;
  int H;
  explicit HiddenVectors(int width) : data(static_cast<size_t>(N) * width), H(width) {}
  float* at(int i) { return data.data() + static_cast<size_t>(i) * H; }
};

// out[qi] for queries [begin, end).
template <int FixedH>
GPA_CPU_CLONES void forward_range(const BlendArgs& a, int64_t begin, int64_t end, float* o) {
  const int H = FixedH > 0 ? FixedH : a.H;
  HiddenVectors<FixedH, 2> vectors(H);
  float* h = vectors.at(0);
  float* g = vectors.at(1);
  float w_k[kMaxK], gamma[kEmbedDim];
  for (int64_t qi = begin; qi < end; ++qi) {
    const float total = neighbor_weights(a, qi, w_k);
    for (int j = 0; j < H; ++j) g[j] = 0.0f;
    for (int k = 0; k < a.K; ++k) {
      const float* row = neighbor_embedding(a, qi, k, gamma);
      hidden_preactivation(row, a.w1_dir_t, gamma, H, h);
      accumulate_relu(h, w_k[k], H, g);
    }
    project_output_t(a.w2_t, a.b2, g, total, H, a.C, o + qi * a.C);
  }
}

// Adds the gradients of queries [begin, end) into one thread's buffer:
// (table rows, H) | (27, H) | (C, H) | (C).
template <int FixedH>
GPA_CPU_CLONES void backward_range(const BlendArgs& a, const float* grad_out, int64_t begin,
                                   int64_t end, int64_t table_size, float* buf) {
  const int H = FixedH > 0 ? FixedH : a.H;
  float* g_table = buf;
  float* g_w1t = g_table + table_size;
  float* g_w2 = g_w1t + kEmbedDim * H;
  float* g_b2 = g_w2 + a.C * H;
  HiddenVectors<FixedH, 4> vectors(H);
  float* h = vectors.at(0);
  float* g = vectors.at(1);
  float* v = vectors.at(2);
  float* delta = vectors.at(3);
  float w_k[kMaxK], gamma[kEmbedDim];
  for (int64_t qi = begin; qi < end; ++qi) {
    const float* gout = grad_out + qi * a.C;
    const float total = neighbor_weights(a, qi, w_k);
    hidden_gradient(a.w2, gout, H, a.C, v);
    for (int j = 0; j < H; ++j) g[j] = 0.0f;
    for (int k = 0; k < a.K; ++k) {
      const float* row = neighbor_embedding(a, qi, k, gamma);
      hidden_preactivation(row, a.w1_dir_t, gamma, H, h);
      accumulate_relu(h, w_k[k], H, g);
      preactivation_gradient(h, v, w_k[k], H, delta);
      float* gt = g_table + (row - a.table);
      for (int j = 0; j < H; ++j) gt[j] += delta[j];
      for (int c = 0; c < kEmbedDim; ++c) {
        float* gw = g_w1t + c * H;
        for (int j = 0; j < H; ++j) gw[j] += delta[j] * gamma[c];
      }
    }
    for (int o = 0; o < a.C; ++o) {
      float* gw = g_w2 + o * H;
      for (int j = 0; j < H; ++j) gw[j] += gout[o] * g[j];
      g_b2[o] += gout[o] * total;
    }
  }
}

// mma.m16n8k8 (D = A B + D) on the 32 lanes' fragments, by the coordinates of PTX's
// fragment layouts (knn_blend_tiles.h): the products of TF32 values are exact in float, the
// sum runs over k in order (the hardware's order is its own: the GPU's sums may differ in
// the last bits).
void mma_tf32_emulated(float (&d)[32][4], const float (&a)[32][4], const float (&b)[32][2]) {
  float A[16][8], Bm[8][8], D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tid4 = lane & 3;
    A[gid][tid4] = a[lane][0];
    A[gid + 8][tid4] = a[lane][1];
    A[gid][tid4 + 4] = a[lane][2];
    A[gid + 8][tid4 + 4] = a[lane][3];
    Bm[tid4][gid] = b[lane][0];
    Bm[tid4 + 4][gid] = b[lane][1];
    D[gid][2 * tid4] = d[lane][0];
    D[gid][2 * tid4 + 1] = d[lane][1];
    D[gid + 8][2 * tid4] = d[lane][2];
    D[gid + 8][2 * tid4 + 1] = d[lane][3];
  }
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < 8; ++k) acc += A[m][k] * Bm[k][n];
      D[m][n] += acc;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int gid = lane >> 2, tid4 = lane & 3;
    d[lane][0] = D[gid][2 * tid4];
    d[lane][1] = D[gid][2 * tid4 + 1];
    d[lane][2] = D[gid + 8][2 * tid4];
    d[lane][3] = D[gid + 8][2 * tid4 + 1];
  }
}

// Phase B of the tensor-core forward (knn_blend.cu's tile_hidden_forward_tc), warp by warp:
// the same fragments, the emulated product, the same lane terms and butterfly sums.
void tile_hidden_forward_tc_cpu(const BlendArgs& a, float* sh) {
  for (int w = 0; w < kTcWarps; ++w) {
    float wa[kTcSteps][32][4];
    for (int s = 0; s < kTcSteps; ++s)
      for (int lane = 0; lane < 32; ++lane) tc_a_fragment(sh, w, lane, s, wa[s][lane]);
    for (int n = 0; n < kTileQueries; ++n) {
      float d[32][4] = {};
      for (int s = 0; s < kTcSteps; ++s) {
        float b[32][2];
        for (int lane = 0; lane < 32; ++lane) tc_b_fragment(sh, lane, n, s, b[lane]);
        mma_tf32_emulated(d, wa[s], b);
      }
      for (int lane = 0; lane < 32; ++lane) {
        float rows[4];
        tc_table_fragment(a, sh, w, lane, n, rows);
        for (int i = 0; i < 4; ++i) d[lane][i] += rows[i];
      }
      float lo[32], hi[32];
      for (int lane = 0; lane < 32; ++lane) tc_lane_terms(sh, lane, n, d[lane], lo[lane], hi[lane]);
      for (int x = 1; x <= 2; x <<= 1) {  // __shfl_xor_sync(.., 1), then (.., 2)
        float lo2[32], hi2[32];
        for (int lane = 0; lane < 32; ++lane) {
          lo2[lane] = lo[lane] + lo[lane ^ x];
          hi2[lane] = hi[lane] + hi[lane ^ x];
        }
        std::copy(lo2, lo2 + 32, lo);
        std::copy(hi2, hi2 + 32, hi);
      }
      for (int lane = 0; lane < 32; ++lane) tc_store_g(sh, w, lane, n, lo[lane], hi[lane]);
    }
  }
}

// The tiled kernels of knn_blend_tiles.h on the CPU: the CUDA kernels' blocks, tiles,
// phases and shared-memory layout, each phase run for every thread in turn (tests of that
// code without a GPU; GPAVATAR_BLEND_FORWARD / GPAVATAR_BLEND_BACKWARD=tiles; tf32: tiles_tf32).  Serial: a
// test path.
at::Tensor forward_tiles_cpu(const Prepared& p, bool tf32) {
  const BlendArgs& a = p.args;
  const int64_t tiles = tile_count(a);
  const int64_t blocks = tile_blocks(tiles, /*multiprocessors=*/1, kTileForwardBlocksPerSM);
  at::Tensor out = at::empty({a.B, a.M, a.C}, p.queries.options());
  std::vector<float> sh(kTileForwardFloats);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int t = 0; t < kTileThreads; ++t) tile_stage_forward_weights(a, t, kTileThreads, sh.data(), tf32);
    for (int64_t tile = block; tile < tiles; tile += blocks) {
      for (int t = 0; t < kTileThreads; ++t) tile_pair_terms(a, tile, t, sh.data(), tf32);
      if (tf32) {
        tile_hidden_forward_tc_cpu(a, sh.data());
      } else {
        for (int t = 0; t < kTileThreads; ++t) tile_hidden_forward(a, t, sh.data());
      }
      for (int t = 0; t < kTileThreads; ++t) tile_output(a, tile, t, sh.data(), out.data_ptr<float>());
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tiles_cpu(const at::Tensor& grad_out,
                                                                             const Prepared& p) {
  const BlendArgs& a = p.args;
  const int64_t tiles = tile_count(a);
  const int64_t blocks = tile_blocks(tiles, /*multiprocessors=*/1);
  auto opts = p.queries.options();
  at::Tensor grad_table = at::zeros({p.table.size(0), a.H}, opts);
  at::Tensor hidden = at::empty({a.B * a.M, a.H}, opts);
  at::Tensor total = at::empty({a.B * a.M}, opts);
  at::Tensor part_w1 = at::empty({2 * blocks, kEmbedDim, a.H}, opts);
  const float* go = grad_out.data_ptr<float>();
  std::vector<float> sh(kTileSharedFloats);
  std::vector<float> acc(static_cast<size_t>(kTileThreads) * kEmbedDim);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int t = 0; t < kTileThreads; ++t) tile_stage_weights(a, t, kTileThreads, sh.data());
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t tile = block; tile < tiles; tile += blocks) {
      for (int t = 0; t < kTileThreads; ++t) tile_pair_terms(a, tile, t, sh.data());
      for (int t = 0; t < kTileThreads; ++t)
        tile_hidden_backward(a, go, tile, t, sh.data(), hidden.data_ptr<float>(), total.data_ptr<float>(),
                             grad_table.data_ptr<float>());
      for (int t = 0; t < kTileThreads; ++t)
        tile_w1_accumulate(t, sh.data(), *reinterpret_cast<float(*)[kEmbedDim]>(acc.data() + t * kEmbedDim));
    }
    for (int t = 0; t < kTileThreads; ++t)
      tile_w1_store(t, *reinterpret_cast<const float(*)[kEmbedDim]>(acc.data() + t * kEmbedDim),
                    part_w1.data_ptr<float>() + block * 2 * kEmbedDim * a.H);
  }
  const at::Tensor g2 = grad_out.reshape({a.B * a.M, a.C});
  return {grad_table, part_w1.sum(0).t().contiguous(), at::mm(g2.t(), hidden), at::mv(g2.t(), total)};
}

at::Tensor forward_cpu(const at::Tensor& queries, const at::Tensor& points,
                       const at::Tensor& dist2, const at::Tensor& idx, const at::Tensor& table,
                       const at::Tensor& w1_dir, const at::Tensor& w2, const at::Tensor& b2,
                       const std::optional<at::Tensor>& weight_sum, double eps) {
  Prepared p = prepare(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps);
  check_indices(p.idx, p.args.P);
  const ForwardMethod method = blend_forward_method(false);
  if (method != ForwardMethod::kQueries && tiles_forward_supported(p.args))
    return forward_tiles_cpu(p, method == ForwardMethod::kTilesTf32);
  p.w2_t = p.w2.t().contiguous();  // project_output_t reads (H, C)
  p.args.w2_t = p.w2_t.data_ptr<float>();
  const BlendArgs& a = p.args;
  at::Tensor out = at::empty({a.B, a.M, a.C}, queries.options());
  float* o = out.data_ptr<float>();
  const Loops loops = cpu_loops(a.H);
  at::parallel_for(0, a.B * a.M, 16,
                   [&](int64_t begin, int64_t end) {
#if defined(GPA_KNN_BLEND_AVX2)
                     if (loops == Loops::kAvx512) {
                       switch (a.H) {
                         case 16: return avx512::forward_range<1>(a, begin, end, o);
                         case 32: return avx512::forward_range<2>(a, begin, end, o);
                         default: return avx512::forward_range<4>(a, begin, end, o);
                       }
                     }
                     if (loops == Loops::kAvx2) {
                       switch (a.H) {
                         case 8: return avx2::forward_range<1>(a, begin, end, o);
                         case 16: return avx2::forward_range<2>(a, begin, end, o);
                         case 32: return avx2::forward_range<4>(a, begin, end, o);
                         default: return avx2::forward_range<8>(a, begin, end, o);
                       }
                     }
#endif
                     if (a.H == 64) {
                       forward_range<64>(a, begin, end, o);
                     } else if (a.H == 32) {
                       forward_range<32>(a, begin, end, o);
                     } else {
                       forward_range<0>(a, begin, end, o);
                     }
                   });
  return out;
}

// The gather backward of knn_blend.h on the CPU: the CUDA kernels' pair order, chunks and
// per-unit sums (tests of that arithmetic without a GPU; GPAVATAR_BLEND_BACKWARD=gather).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_gather_cpu(const at::Tensor& grad_out,
                                                                              const Prepared& p) {
  const BlendArgs& a = p.args;
  const GatherPlan plan = make_gather_plan(p, grad_out);
  const int H = a.H;
  const int64_t* perm = plan.perm.data_ptr<int64_t>();
  const int64_t* row_start = plan.row_start.data_ptr<int64_t>();
  const int64_t* chunk_start = plan.chunk_start.data_ptr<int64_t>();
  const float* v = plan.v.data_ptr<float>();
  const int64_t chunks = chunk_start[plan.rows];
  auto opts = p.queries.options();
  at::Tensor part_table = at::zeros({std::max<int64_t>(chunks, 1), H}, opts);
  at::Tensor part_w1 = at::zeros({std::max<int64_t>(chunks, 1), kEmbedDim, H}, opts);
  float* pt = part_table.data_ptr<float>();
  float* pw = part_w1.data_ptr<float>();
  at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
    float gamma[kEmbedDim];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = chunk_row(chunk_start, plan.rows, c);
      const int64_t s0 = row_start[row] + (c - chunk_start[row]) * kGatherChunk;
      const int64_t s1 = std::min(s0 + kGatherChunk, row_start[row + 1]);
      float* acc_t = pt + c * H;
      float* acc_w = pw + c * kEmbedDim * H;
      for (int64_t s = s0; s < s1; ++s) {
        float weight;
        int64_t qi;
        const float* trow = pair_terms(a, perm[s], gamma, weight, qi);
        for (int j = 0; j < H; ++j) {
          const float h = hidden_unit(trow, a.w1_dir_t, gamma, H, j);
          const float d = relu_passes(h) ? weight * v[qi * H + j] : 0.0f;
          acc_t[j] += d;
          for (int e = 0; e < kEmbedDim; ++e) acc_w[e * H + j] += d * gamma[e];
        }
      }
    }
  });
  at::Tensor grad_table = at::zeros({plan.rows, H}, opts);
  float* gt = grad_table.data_ptr<float>();
  at::parallel_for(0, plan.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = chunk_start[r]; c < chunk_start[r + 1]; ++c)
        for (int j = 0; j < H; ++j) gt[r * H + j] += pt[c * H + j];
  });
  // grad_w2 = grad_out^T hidden, grad_b2 = grad_out^T total, from every query's g.
  at::Tensor hidden = at::empty({a.B * a.M, H}, opts);
  at::Tensor total = at::empty({a.B * a.M}, opts);
  float* hd = hidden.data_ptr<float>();
  float* tt = total.data_ptr<float>();
  at::parallel_for(0, a.B * a.M, 64, [&](int64_t begin, int64_t end) {
    float w[kMaxK], gamma[kEmbedDim];
    for (int64_t qi = begin; qi < end; ++qi) {
      tt[qi] = neighbor_weights(a, qi, w);
      float* g = hd + qi * H;
      for (int j = 0; j < H; ++j) g[j] = 0.0f;
      for (int k = 0; k < a.K; ++k) {
        const float* trow = neighbor_embedding(a, qi, k, gamma);
        if (trow == nullptr) continue;
        for (int j = 0; j < H; ++j) g[j] += w[k] * relu_f(hidden_unit(trow, a.w1_dir_t, gamma, H, j));
      }
    }
  });
  const at::Tensor go = grad_out.reshape({a.B * a.M, a.C});
  at::Tensor grad_w2 = at::mm(go.t(), hidden);
  at::Tensor grad_b2 = at::mv(go.t(), total);
  return {grad_table, part_w1.sum(0).t().contiguous(), grad_w2, grad_b2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& queries, const at::Tensor& points,
    const at::Tensor& dist2, const at::Tensor& idx, const at::Tensor& table,
    const at::Tensor& w1_dir, const at::Tensor& w2, const std::optional<at::Tensor>& weight_sum,
    double eps) {
  const Prepared p =
      prepare(queries, points, dist2, idx, table, w1_dir, w2, at::Tensor(), weight_sum, eps);
  check_grad_out(grad_out, p);
  check_indices(p.idx, p.args.P);
  const at::Tensor go = grad_out.contiguous();
  const BackwardMethod method = blend_backward_method(false);
  if (method == BackwardMethod::kGather) return backward_gather_cpu(go, p);
  if (method == BackwardMethod::kTiles && tiles_supported(p.args)) return backward_tiles_cpu(go, p);
  const BlendArgs& a = p.args;
  const int64_t rows = table.size(0);
  const int64_t table_size = rows * a.H, w1_size = kEmbedDim * a.H, w2_size = a.C * a.H;
  const int64_t per_thread = table_size + w1_size + w2_size + a.C;
  const int threads = at::get_num_threads();
  std::vector<float> buffers(static_cast<size_t>(threads) * per_thread, 0.0f);
  const int64_t n = a.B * a.M;
  const int64_t grain = std::max<int64_t>(16, (n + threads - 1) / threads);

  const Loops loops = cpu_loops(a.H);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float* buf = buffers.data() + static_cast<size_t>(at::get_thread_num()) * per_thread;
#if defined(GPA_KNN_BLEND_AVX2)
    const float* g = go.data_ptr<float>();
    if (loops == Loops::kAvx512) {
      switch (a.H) {
        case 16: return avx512::backward_range<1>(a, g, begin, end, table_size, buf);
        case 32: return avx512::backward_range<2>(a, g, begin, end, table_size, buf);
        default: return avx512::backward_range<4>(a, g, begin, end, table_size, buf);
      }
    }
    if (loops == Loops::kAvx2) {
      switch (a.H) {
        case 8: return avx2::backward_range<1>(a, g, begin, end, table_size, buf);
        case 16: return avx2::backward_range<2>(a, g, begin, end, table_size, buf);
        case 32: return avx2::backward_range<4>(a, g, begin, end, table_size, buf);
        default: return avx2::backward_range<8>(a, g, begin, end, table_size, buf);
      }
    }
#endif
    if (a.H == 64) {
      backward_range<64>(a, go.data_ptr<float>(), begin, end, table_size, buf);
    } else if (a.H == 32) {
      backward_range<32>(a, go.data_ptr<float>(), begin, end, table_size, buf);
    } else {
      backward_range<0>(a, go.data_ptr<float>(), begin, end, table_size, buf);
    }
  });

  // Sum the per-thread buffers (in thread order: deterministic).
  std::vector<float> sum(per_thread, 0.0f);
  for (int th = 0; th < threads; ++th) {
    const float* buf = buffers.data() + static_cast<size_t>(th) * per_thread;
    at::parallel_for(0, per_thread, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) sum[e] += buf[e];
    });
  }
  auto opts = queries.options();
  at::Tensor grad_table = at::empty({rows, a.H}, opts);
  at::Tensor grad_w1t = at::empty({kEmbedDim, a.H}, opts);
  at::Tensor grad_w2 = at::empty({a.C, a.H}, opts);
  at::Tensor grad_b2 = at::empty({a.C}, opts);
  std::copy(sum.begin(), sum.begin() + table_size, grad_table.data_ptr<float>());
  std::copy(sum.begin() + table_size, sum.begin() + table_size + w1_size,
            grad_w1t.data_ptr<float>());
  std::copy(sum.begin() + table_size + w1_size, sum.begin() + table_size + w1_size + w2_size,
            grad_w2.data_ptr<float>());
  std::copy(sum.begin() + table_size + w1_size + w2_size, sum.end(), grad_b2.data_ptr<float>());
  return {grad_table, grad_w1t.t().contiguous(), grad_w2, grad_b2};
}

}  // namespace
}  // namespace knn_blend
}  // namespace gpavatar

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) {
  m.impl("knn_blend_forward", &gpavatar::knn_blend::forward_cpu);
  m.impl("knn_blend_backward", &gpavatar::knn_blend::backward_cpu);
}
