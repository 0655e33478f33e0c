// Torch-side declarations shared by the per-op translation units: input checks
// (one per op, used by every device) and the CPU implementations.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <tuple>

#include "knn/knn_grid.h"
#include "knn_blend/knn_blend.h"
#include "triplane/triplane.h"
#include "rays/rays.h"
#include "composite/composite.h"

namespace gpavatar {

// Tensor checks with messages that name the argument and the expected shape.
void check_float_tensor(const at::Tensor& t, const char* name, int64_t dim, const char* shape);
void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                       const char* name_b);
// Error messages are built here, numbers with std::to_string, and handed to the
// TORCH_CHECK macros as one std::string: an extension built against some torch
// wheels crashed when c10::str formatted integers itself.
namespace detail {
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, char x) { s += x; }
inline void append(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T x) { s += std::to_string(x); }
inline void append(std::string& s, c10::ScalarType x) { s += c10::toString(x); }
inline void append(std::string& s, const c10::Device& x) { s += x.str(); }
}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

// "(2, 3, 4)": a tensor's shape for error messages.
std::string shape_of(const at::Tensor& t);
// A switch read from the environment: one of `choices`, `fallback` when unset or empty; a
// ValueError "NAME must be a, b or c, got 'x'" otherwise.
std::string env_choice(const char* name, std::initializer_list<const char*> choices, const char* fallback);
// A batch size B that a CUDA grid's y dimension (<= 65535) covers; a ValueError naming the
// argument otherwise.
void check_grid_batch(int64_t B, const char* name);
// check_float_tensor + contiguous (for kernels that read the raw data pointer).
void check_contiguous_float(const at::Tensor& t, const char* name, int64_t dim, const char* shape);

namespace knn {
void check_inputs(const at::Tensor& queries, const at::Tensor& points, int64_t K);
// knn_cpu_list_cache(on): enter (true) or leave (false) a block in which CPU knn calls on the same
// points reuse their cell lists (knn_cpu.cpp); the lists are dropped when the last block is left.
// Returns the number of point clouds whose lists were held before the call.
int64_t knn_cpu_list_cache(bool on);
// One knn / knn_search call after check_inputs: its inputs made contiguous, its outputs dist2
// (B, M, K) float and idx (B, M, K) int64 allocated on their device (the caller sets the device
// guard and returns the outputs as they are when B * M == 0).
struct Call {
  at::Tensor queries, points, dist2, idx;
  int64_t B, M, P;
  bool empty() const { return B == 0 || M == 0; }
};
Call knn_call(const at::Tensor& queries_in, const at::Tensor& points_in, int64_t K);
// knn_index's inputs: points (B, P, 3), query_box (B, 6) on their device, K.
void check_index_inputs(const at::Tensor& points, const at::Tensor& query_box, int64_t K);
// knn_search's index (the 6 tensors of knn_index: geom, offset, cand, cell_bound, band_count,
// seeds) against these queries, points and K; returns G, the cells per axis.
int check_index(at::TensorList index, const at::Tensor& queries, const at::Tensor& points, int64_t K);

// The spatial grid of knn_grid.h, built with tensor ops on the points' device.
constexpr int64_t kGridMinPoints = 256;  // below this brute force is cheaper
constexpr double kGridPointsPerCell = 2.0;
// From this many queries per batch element on, the cell lists of knn_cells.h
// (their build costs about as much as scanning a few thousand queries on CUDA;
// on the CPU, with the grid size scaled to M, they beat the grid from ~1000
// queries: 3.3 vs 6.0 ms at 4096 render samples, 2 threads).
constexpr int64_t kCellsMinQueries = 8192;
constexpr int64_t kCellsMinQueriesCpu = 1024;
// Axes whose extent is below this (or not finite) are not subdivided (see build_grid).
constexpr double kMinGridExtent = 1e-15;
// The search method (knn_cpu.cpp): GPAVATAR_KNN = auto | brute | grid | cells.
enum class Method { kBrute, kGrid, kCells };
// auto: brute force below kGridMinPoints points, the cell lists from cells_min_queries queries,
// `small` in between (CUDA: brute force, whose launch needs no host sync, so a frame can be
// captured in a CUDA graph; the grid's build reads its size back to the host).
Method choose_method(int64_t M, int64_t P, int64_t cells_min_queries = kCellsMinQueries,
                     Method small = Method::kGrid);
// GPAVATAR_KNN_CUDA_SEARCH = banded (default: the faster on an H200) | unrolled (banded with
// the next entry's load issued before the current entry is offered: 1.61 ms against 1.62 on an
// H200, no gain) | buffered (the seed bound and per-query buffer of knn_cells.h; exact too) |
// grouped (scan_grouped of knn_cells.h: the entries' distances four at a time, offered only when
// one can enter; not yet timed on a GPU): the CUDA cell scan (knn_cells.h's kSearch*), and the
// one the CPU's CUDA-layout path (GPAVATAR_KNN_LAYOUT=cuda) runs.  A ValueError for other values.
int cuda_search_mode();
// GPAVATAR_KNN_CUDA_BUILD = two_level (default: the lists of 16^3 cells from their 8^3 parents'
// lists; 1.48 ms against 1.62 for the flat build on an H200, render samples, M = 524288,
// P = 5023) | flat | one_pass (two_level in one launch: each list reserves its room with an
// atomic and is filled at once; not yet timed on a GPU): how the CUDA path's cell lists are
// built (knn_cells.h / knn_cells.cu; the same lists either way); also read by
// GPAVATAR_KNN_LAYOUT=cuda (one_pass builds there as two_level: the same lists and offsets).
enum class Build { kFlat, kTwoLevel, kOnePass };
Build cuda_build();
// GPAVATAR_KNN_CUDA_COMPACT = ballot (default) | match (not yet timed on a GPU): how a warp of the
// CUDA list build places a step's 32 entries in their bands: a ballot per band (16 a step), or
// one __match_any_sync and a counter per band in shared memory (knn_cells.cu: band_place).  The
// same lists either way (a CUDA test checks them against the CPU layout); the CPU ignores it.
bool cuda_match_compaction();
// GPAVATAR_KNN_CUDA_ORDER = box (default: bands of mindist^2 to the cell's box) | centre (bands
// of the distance from the cell's centre: knn_cells.h; not yet timed on a GPU, tried by the
// real-time tuner): the band order of the lists the CUDA path (and GPAVATAR_KNN_LAYOUT=cuda)
// builds and searches (each compiled for one order); an index records its order, and a search
// under the other one sends its queries to the brute-force scan (exact).  Returns kOrderBox /
// kOrderCentre of knn_cells.h.
int cuda_list_order();
// An integer environment variable in [lo, hi] (fallback when unset); a ValueError otherwise.
int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi);
struct GridTensors {
  at::Tensor lo, cell, inv_cell, dims, cell_offset, start, x, y, z, index;
  GridView view;
};
GridTensors build_grid(const at::Tensor& points);  // points: (B, P, 3) float32 contiguous
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& points,
                                           int64_t K);
}  // namespace knn

namespace knn_blend {
// Contiguous copies of one call's inputs (w1_dir transposed to (27, H)) and the
// raw BlendArgs view of them; `b2` may be undefined (the backward needs none).
struct Prepared {
  at::Tensor queries, points, dist2, idx, table, w1_dir_t, w2, w2_t, b2, weight_sum;
  BlendArgs args;
};
Prepared prepare(const at::Tensor& queries, const at::Tensor& points, const at::Tensor& dist2,
                 const at::Tensor& idx, const at::Tensor& table, const at::Tensor& w1_dir,
                 const at::Tensor& w2, const at::Tensor& b2,
                 const std::optional<at::Tensor>& weight_sum, double eps);
void check_grad_out(const at::Tensor& grad_out, const Prepared& p);
// The gather backward's pair order (knn_blend.h): perm (N = B*M*K) pair ids sorted by table
// row (stably; out-of-range indices last), row_start / chunk_start (rows + 1), max_chunks (an
// upper bound of chunk_start[rows], known without a host sync), v = grad_out W2 (B*M, H).
struct GatherPlan {
  at::Tensor perm, row_start, chunk_start, v;
  int64_t rows = 0, max_chunks = 0;
};
GatherPlan make_gather_plan(const Prepared& p, const at::Tensor& grad_out);
// GPAVATAR_BLEND_BACKWARD = auto (default) | buffers | gather | tiles: which backward the
// CPU/CUDA kernels run (tiles: knn_blend_tiles.h, where tiles_supported; buffers elsewhere).
// auto: tiles on CUDA (an H200 measured 2.4 ms for the tiles kernel against 7.2 ms for the
// buffers kernel + 1.9 ms of index_add at the paper size), gather there under
// torch.use_deterministic_algorithms(True) (no atomics), buffers on the CPU (the tiles' CPU
// mirror is a serial test of their arithmetic).
enum class BackwardMethod { kBuffers, kGather, kTiles };
// GPAVATAR_BLEND_FORWARD = auto (default: tiles on CUDA, queries on the CPU) | queries (one
// thread per query) | tiles (knn_blend_tiles.h, where tiles_forward_supported; the same
// numbers as queries, bit for bit on the CPU) | tiles_tf32 (the tiles with the hidden layer's
// direction products on the tensor cores in TF32, knn_blend_tiles.h; on the CPU an emulation
// of the same fragments; CUDA: compute capability 8.0 or more; not yet timed on a GPU).
enum class ForwardMethod { kQueries, kTiles, kTilesTf32 };
ForwardMethod blend_forward_method(bool on_cuda);
BackwardMethod blend_backward_method(bool on_cuda);
void check_inputs(const at::Tensor& queries, const at::Tensor& points, const at::Tensor& dist2,
                  const at::Tensor& idx, const at::Tensor& table, const at::Tensor& w1_dir,
                  const at::Tensor& w2, const at::Tensor& b2,
                  const std::optional<at::Tensor>& weight_sum, double eps);
}  // namespace knn_blend

namespace triplane {
// Checks planes (B, 3, H, W, C) / coords (B, M, 3) and returns the raw view of them.
Args check_inputs(const at::Tensor& planes, const at::Tensor& coords, bool concat);
// Checks extra (B, M, E) float32 contiguous on planes' device and sets a.extra / a.E.
void check_extra(Args& a, const at::Tensor& extra, const at::Tensor& planes);
void check_grad_out(const Args& a, const at::Tensor& grad_out, const at::Tensor& planes);
}  // namespace triplane

namespace rays {
void check_ray_box(const at::Tensor& origins, const at::Tensor& dirs, double lo, double hi);
void check_stratified(const at::Tensor& t0, const at::Tensor& t1, int64_t S,
                      const std::optional<at::Tensor>& u);
void check_importance(const at::Tensor& t, const at::Tensor& w, int64_t n,
                      const std::optional<at::Tensor>& offset);
void check_merge(const at::Tensor& a, const at::Tensor& b);
}  // namespace rays

namespace composite {
// alphas (R, S), values (R, S, C), depths (R, S) or none; all float32 contiguous.
void check_inputs(const at::Tensor& alphas, const at::Tensor& values,
                  const std::optional<at::Tensor>& depths);
// The raw view of checked inputs.
Args make_args(const at::Tensor& alphas, const at::Tensor& values,
               const std::optional<at::Tensor>& depths);
void check_grads(const at::Tensor& alphas, const at::Tensor& values, const at::Tensor& grad_color,
                 const at::Tensor& grad_opacity, const at::Tensor& grad_weights,
                 const at::Tensor& grad_depth);
// The forward's outputs for `a`: color (R, C), opacity (R), weights (R, S), depth (R); zeros
// except the weights (with S == 0 or C == 0 the kernels do not run).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(const Args& a,
                                                                           const at::TensorOptions& options);
// The merged form: alphas_a (R, Sa), values_a (R, Sa, C), alphas_b (R, Sb), values_b (R, Sb, C)
// float32, order (R, Sa + Sb) int64, depths (R, Sa + Sb) float32 or none; all contiguous.
Args merged_args(const at::Tensor& alphas_a, const at::Tensor& values_a, const at::Tensor& alphas_b,
                 const at::Tensor& values_b, const at::Tensor& order, const std::optional<at::Tensor>& depths);
}  // namespace composite

}  // namespace gpavatar
