// Tri-plane sampling (SPEC section 4): the arithmetic shared by the CPU and
// CUDA kernels.  No torch headers, so triplane.cu compiles in seconds.
//
// Contract (checked in triplane_cpu.cpp / triplane_cuda.cpp):
//   planes  (B, 3, H, W, C) channels-last, contiguous; float32, float16 or bfloat16
//   coords  (B, M, 3) float32 contiguous
//   out     (B, M, C) for the mean of the planes, (B, M, 3C) for their concatenation;
//           with extra (B, M, E) float32 contiguous, each row followed by its E extra floats
// Plane t reads point (x, y, z) at (u, v) = (x, y), (x, z), (z, y); u indexes the
// width, v the height; bilinear, zero padding, align_corners=False (grid_sample).
// Every texel read is bounds-checked, so any coordinate is safe; a NaN or infinite
// one reads NaN on the planes it takes part in, as grid_sample (miss_value).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace gpavatar {
namespace triplane {

enum PlaneDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// 16-bit storage types: the kernels read their bits and widen to float.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

GPA_HD float to_float(float v) { return v; }

GPA_HD float to_float(BFloat16 v) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
#else
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
#endif
}

GPA_HD float to_float(Half v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  uint32_t word;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  } else if (exponent == 31) {  // inf / nan
    word = sign | 0x7f800000u | (mantissa << 13);
  } else {
    word = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
#endif
}

// The coordinate of point `p` that plane t uses as u (width) and as v (height).
GPA_HD int u_axis(int t) { return t == 2 ? 2 : 0; }
GPA_HD int v_axis(int t) { return t == 1 ? 2 : 1; }

// grid_sample's unnormalization for align_corners=False: ((c + 1) * size - 1) / 2.
GPA_HD float unnormalize(float c, int64_t size) {
  return mul_rn(mul_rn(c + 1.f, static_cast<float>(size)) - 1.f, 0.5f);
}

// Where a point falls on one plane: the top-left corner (x0, y0) of its texel
// cell (-1 <= x0 <= W-1, -1 <= y0 <= H-1) and the bilinear weights.  `hit` is
// false when no corner is inside the plane: the point reads miss_value (below).
struct Cell {
  int64_t x0, y0;
  float ix, iy;            // continuous texel coordinates
  float wx0, wx1, wy0, wy1;  // wx1 = ix - x0, wx0 = x0 + 1 - ix
  bool hit;
};

GPA_HD Cell locate(float u, float v, int64_t H, int64_t W) {
  Cell cell;
  cell.ix = unnormalize(u, W);
  cell.iy = unnormalize(v, H);
  const float fx = floorf(cell.ix), fy = floorf(cell.iy);
  // Compared in float before any integer conversion: huge or NaN coordinates miss.
  cell.hit = fx >= -1.f && fx <= static_cast<float>(W - 1) && fy >= -1.f &&
             fy <= static_cast<float>(H - 1);
  if (!cell.hit) {
    cell.x0 = cell.y0 = 0;
    cell.wx0 = cell.wx1 = cell.wy0 = cell.wy1 = 0.f;
    return cell;
  }
  cell.x0 = static_cast<int64_t>(fx);
  cell.y0 = static_cast<int64_t>(fy);
  cell.wx1 = cell.ix - fx;
  cell.wx0 = (fx + 1.f) - cell.ix;
  cell.wy1 = cell.iy - fy;
  cell.wy0 = (fy + 1.f) - cell.iy;
  return cell;
}

GPA_HD Cell locate_on_plane(const float* point, int t, int64_t H, int64_t W) {
  return locate(point[u_axis(t)], point[v_axis(t)], H, W);
}

// What a plane's reading starts from: 0, or NaN where ix or iy is not finite (a NaN or infinite
// coordinate, or one whose texel coordinate overflows: the point misses the plane).  That is
// grid_sample's arithmetic (and the Triton kernels'): the zero padding times bilinear weights that
// are NaN there (inf - inf).  Only unvalidated input gets NaN (validate=False).
GPA_HD float miss_value(const Cell& c) { return finite_f(c.ix) && finite_f(c.iy) ? 0.f : __builtin_nanf(""); }

// The coordinate gradient of a missed plane, by the same arithmetic: the texels are 0, but the
// weights' derivatives carry NaN across: d/du is NaN where iy is not finite, d/dv where ix is not.
GPA_HD void add_miss_coord_grad(const Cell& c, int t, float grad[3]) {
  if (!finite_f(c.iy)) grad[u_axis(t)] = __builtin_nanf("");
  if (!finite_f(c.ix)) grad[v_axis(t)] = __builtin_nanf("");
}

// Corner k in the order of grid_sample: 0 = (y0, x0), 1 = (y0, x0+1), 2 = (y0+1, x0), 3 = (y0+1, x0+1).
GPA_HD int64_t corner_x(const Cell& c, int k) { return c.x0 + (k & 1); }
GPA_HD int64_t corner_y(const Cell& c, int k) { return c.y0 + (k >> 1); }
GPA_HD float corner_weight(const Cell& c, int k) {
  return mul_rn((k & 1) ? c.wx1 : c.wx0, (k >> 1) ? c.wy1 : c.wy0);
}
GPA_HD bool corner_inside(const Cell& c, int k, int64_t H, int64_t W) {
  const int64_t x = corner_x(c, k), y = corner_y(c, k);
  return c.hit && x >= 0 && x < W && y >= 0 && y < H;
}
// Offset (in texels) of corner k inside its plane.
GPA_HD int64_t corner_texel(const Cell& c, int k, int64_t W) {
  return corner_y(c, k) * W + corner_x(c, k);
}

// d(corner weight k)/d ix and d/d iy.
GPA_HD float weight_dx(const Cell& c, int k) {
  const float wy = (k >> 1) ? c.wy1 : c.wy0;
  return (k & 1) ? wy : -wy;
}
GPA_HD float weight_dy(const Cell& c, int k) {
  const float wx = (k & 1) ? c.wx1 : c.wx0;
  return (k >> 1) ? wx : -wx;
}

// The gradient of one plane's reading: with d[k] = <upstream, value of corner k>
// (0 for corners outside), add d/du and d/dv to the point's coordinate gradient.
GPA_HD void add_coord_grad(const Cell& c, const float d[4], int t, int64_t H, int64_t W,
                           float grad[3]) {
  float gx = 0.f, gy = 0.f;
  for (int k = 0; k < 4; ++k) {
    gx += weight_dx(c, k) * d[k];
    gy += weight_dy(c, k) * d[k];
  }
  grad[u_axis(t)] += gx * (static_cast<float>(W) * 0.5f);
  grad[v_axis(t)] += gy * (static_cast<float>(H) * 0.5f);
}

// Deterministic plane gradient: points are sorted by (b, t, cell) and every texel
// gathers from the four cells it is a corner of.  Cell (y0, x0) has key
// ((b*3 + t) * (H+1) + y0 + 1) * (W+1) + x0 + 1; points that miss a plane get
// the key B*3*(H+1)*(W+1), past every cell.
GPA_HD int64_t cell_key(const Cell& c, int64_t bt, int64_t H, int64_t W, int64_t missing) {
  return c.hit ? (bt * (H + 1) + c.y0 + 1) * (W + 1) + c.x0 + 1 : missing;
}

struct Args {
  const void* planes;   // (B, 3, H, W, C)
  const float* coords;  // (B, M, 3)
  int64_t B, M, H, W, C;
  int dtype;            // PlaneDType
  bool concat;
  // Forward only (triplane_sample_forward_extra): (B, M, E) features copied after the tri-plane
  // features of each output row, which then holds C (or 3C) + E floats.
  const float* extra = nullptr;
  int64_t E = 0;
};

// Tri-plane floats of one output row (and of one grad_out row): 3C for the concatenation, C for the mean.
GPA_HD int64_t feature_width(const Args& a) { return a.concat ? 3 * a.C : a.C; }
// Floats of one output row of the forward: the tri-plane features, then the E extra ones.
GPA_HD int64_t out_row(const Args& a) { return feature_width(a) + a.E; }

// CUDA launchers (triplane.cu); they return a cudaError_t as int.
int launch_forward_cuda(const Args& a, float* out, void* stream);
// grad_out (B, M, C or 3C); grad_planes float32 (B, 3, H, W, C), zeroed by the caller, or null;
// grad_coords (B, M, 3) or null.
int launch_backward_cuda(const Args& a, const float* grad_out, float* grad_planes,
                         float* grad_coords, void* stream);
// keys (B * 3 * M) int64: cell_key of every (b, t, m), flattened in that order.
int launch_cell_keys_cuda(const Args& a, int64_t* keys, void* stream);
// Deterministic plane gradient from the sorted order (indices into the flattened (b, t, m))
// and cell_start (B*3*(H+1)*(W+1) + 1 offsets into it); writes every texel of grad_planes.
int launch_gather_planes_cuda(const Args& a, const float* grad_out, const int64_t* order,
                              const int64_t* cell_start, float* grad_planes, void* stream);

}  // namespace triplane
}  // namespace gpavatar
