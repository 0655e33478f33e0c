// Tri-plane sampling on the CPU with the arithmetic of triplane.h.
//
// Forward and coordinate gradient: parallel over points.  Plane gradient:
// parallel over (batch, plane, band of texel rows); each task owns its band and
// walks the points in order, so the result does not depend on the thread count
// and no atomics are needed (the CPU backward is always deterministic).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "triplane/triplane.h"

namespace gpavatar {
namespace triplane {

namespace {

constexpr int64_t kChannelBlock = 64;  // channels accumulated on the stack at once

constexpr int64_t kGroup = 8;  // points whose texels are prefetched together

// Texel reads are random in a plane much larger than the caches: locate a group
// of points first and prefetch all their corner rows, so the misses overlap.
template <typename T>
void locate_group(const Args& a, int64_t bm0, int64_t n, Cell (*cells)[3]) {
  const T* planes = static_cast<const T*>(a.planes);
  const int64_t H = a.H, W = a.W, C = a.C, plane_size = H * W * C;
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bm = bm0 + i, b = bm / a.M;
    for (int t = 0; t < 3; ++t) {
      const Cell cell = locate_on_plane(a.coords + bm * 3, t, H, W);
      cells[i][t] = cell;
      for (int k = 0; k < 4; ++k) {
        if (!corner_inside(cell, k, H, W)) continue;
        const char* row = reinterpret_cast<const char*>(planes + (b * 3 + t) * plane_size +
                                                        corner_texel(cell, k, W) * C);
        for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(row + byte);
      }
    }
  }
}

template <typename T>
void forward_range(const Args& a, float* out, int64_t begin, int64_t end) {
  const T* planes = static_cast<const T*>(a.planes);
  const int64_t H = a.H, W = a.W, C = a.C, plane_size = H * W * C;
  const int64_t row = out_row(a);
  float acc[3][kChannelBlock];
  Cell group[kGroup][3];
  for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
    const int64_t n_points = std::min(kGroup, end - g0);
    locate_group<T>(a, g0, n_points, group);
    for (int64_t i = 0; i < n_points; ++i) {
      const int64_t bm = g0 + i, b = bm / a.M;
      const Cell* cells = group[i];
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t n = std::min(kChannelBlock, C - c0);
        for (int t = 0; t < 3; ++t) {
          float* dst = acc[t];
          std::fill(dst, dst + n, miss_value(cells[t]));  // 0, NaN for a non-finite point
          const T* plane = planes + (b * 3 + t) * plane_size + c0;
          for (int k = 0; k < 4; ++k) {
            if (!corner_inside(cells[t], k, H, W)) continue;
            const float w = corner_weight(cells[t], k);
            const T* src = plane + corner_texel(cells[t], k, W) * C;
            for (int64_t c = 0; c < n; ++c) dst[c] += w * to_float(src[c]);
          }
        }
        float* o = out + bm * row + c0;
        if (a.concat) {
          for (int t = 0; t < 3; ++t) std::copy(acc[t], acc[t] + n, o + t * C);
        } else {
          for (int64_t c = 0; c < n; ++c) o[c] = (acc[0][c] + acc[1][c] + acc[2][c]) / 3.f;
        }
      }
      if (a.E > 0) {  // the row's extra features after the tri-plane ones
        const float* src = a.extra + bm * a.E;
        std::copy(src, src + a.E, out + bm * row + feature_width(a));
      }
    }
  }
}

// Upstream gradient of plane t's reading into g[0, C): grad_out / 3 for the mean (as
// the autograd of (f0 + f1 + f2) / 3 computes it), the plane's slice for concat.
inline void upstream(const Args& a, const float* g_row, int t, float* g) {
  if (a.concat) {
    std::copy(g_row + t * a.C, g_row + (t + 1) * a.C, g);
  } else {
    for (int64_t c = 0; c < a.C; ++c) g[c] = g_row[c] / 3.f;
  }
}

template <typename T>
void coord_grad_range(const Args& a, const float* grad_out, float* grad_coords, int64_t begin,
                      int64_t end) {
  const T* planes = static_cast<const T*>(a.planes);
  const int64_t H = a.H, W = a.W, C = a.C, plane_size = H * W * C;
  const int64_t row = feature_width(a);
  Cell group[kGroup][3];
  std::vector<float> g(C);
  for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
    const int64_t n_points = std::min(kGroup, end - g0);
    locate_group<T>(a, g0, n_points, group);
    for (int64_t i = 0; i < n_points; ++i) {
      const int64_t bm = g0 + i, b = bm / a.M;
      const float* g_row = grad_out + bm * row;
      float grad[3] = {0.f, 0.f, 0.f};
      for (int t = 0; t < 3; ++t) {
        const Cell& cell = group[i][t];
        if (!cell.hit) {
          add_miss_coord_grad(cell, t, grad);
          continue;
        }
        upstream(a, g_row, t, g.data());
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        const T* plane = planes + (b * 3 + t) * plane_size;
        for (int k = 0; k < 4; ++k) {
          if (!corner_inside(cell, k, H, W)) continue;
          const T* src = plane + corner_texel(cell, k, W) * C;
          float dot = 0.f;
          for (int64_t c = 0; c < C; ++c) dot += g[c] * to_float(src[c]);
          d[k] = dot;
        }
        add_coord_grad(cell, d, t, H, W, grad);
      }
      for (int j = 0; j < 3; ++j) grad_coords[bm * 3 + j] = grad[j];
    }
  }
}

// Plane gradient for batch b, plane t, texel rows [y_begin, y_end): every point in
// order adds the corners that fall in those rows.
void plane_grad_task(const Args& a, const float* grad_out, float* grad_planes, int64_t b, int t,
                     int64_t y_begin, int64_t y_end) {
  const int64_t H = a.H, W = a.W, C = a.C;
  const int64_t row = feature_width(a);
  float* plane = grad_planes + (b * 3 + t) * H * W * C;
  std::vector<float> g(C);
  for (int64_t m = 0; m < a.M; ++m) {
    const int64_t bm = b * a.M + m;
    const Cell cell = locate_on_plane(a.coords + bm * 3, t, H, W);
    if (!cell.hit || cell.y0 + 1 < y_begin || cell.y0 >= y_end) continue;
    upstream(a, grad_out + bm * row, t, g.data());
    for (int k = 0; k < 4; ++k) {
      const int64_t y = corner_y(cell, k);
      if (y < y_begin || y >= y_end || !corner_inside(cell, k, H, W)) continue;
      const float w = corner_weight(cell, k);
      float* dst = plane + corner_texel(cell, k, W) * C;
      for (int64_t c = 0; c < C; ++c) dst[c] += w * g[c];
    }
  }
}

template <typename T>
void dispatch_dtype(int dtype, T&& fn) {
  switch (dtype) {
    case kFloat16: fn(Half{}); break;
    case kBFloat16: fn(BFloat16{}); break;
    default: fn(0.f); break;
  }
}

}  // namespace

Args check_inputs(const at::Tensor& planes, const at::Tensor& coords, bool concat) {
  TORCH_CHECK_VALUE(planes.dim() == 5 && planes.size(1) == 3, msg("planes must have shape (B, 3, H, W, C) (channels-last), got ", shape_of(planes)));
  const auto st = planes.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, msg("planes must be float32, float16 or bfloat16, got ", st));
  TORCH_CHECK_VALUE(planes.is_contiguous(), msg("planes must be contiguous (B, 3, H, W, C)"));
  check_contiguous_float(coords, "coords", 3, "(B, M, 3)");
  TORCH_CHECK_VALUE(coords.size(2) == 3, msg("coords must have shape (B, M, 3), got ", shape_of(coords)));
  TORCH_CHECK_VALUE(coords.size(0) == planes.size(0), msg("coords must have shape (", planes.size(0),
                    ", M, 3) (the batch size of planes), got ", shape_of(coords)));
  TORCH_CHECK_VALUE(planes.size(2) >= 1 && planes.size(3) >= 1, msg("planes must have H >= 1 and W >= 1, got ", shape_of(planes)));
  check_same_device(planes, "planes", coords, "coords");
  Args a;
  a.planes = planes.data_ptr();
  a.coords = coords.data_ptr<float>();
  a.B = planes.size(0);
  a.M = coords.size(1);
  a.H = planes.size(2);
  a.W = planes.size(3);
  a.C = planes.size(4);
  a.dtype = st == at::kHalf ? kFloat16 : (st == at::kBFloat16 ? kBFloat16 : kFloat32);
  a.concat = concat;
  return a;
}

void check_extra(Args& a, const at::Tensor& extra, const at::Tensor& planes) {
  check_contiguous_float(extra, "extra", 3, "(B, M, E)");
  TORCH_CHECK_VALUE(extra.size(0) == a.B && extra.size(1) == a.M, msg("extra must have shape (", a.B, ", ", a.M,
                    ", E) (the batch and queries of coords), got ", shape_of(extra)));
  check_same_device(planes, "planes", extra, "extra");
  a.extra = extra.data_ptr<float>();
  a.E = extra.size(2);
}

void check_grad_out(const Args& a, const at::Tensor& grad_out, const at::Tensor& planes) {
  check_contiguous_float(grad_out, "grad_out", 3, a.concat ? "(B, M, 3C)" : "(B, M, C)");
  const int64_t row = feature_width(a);
  TORCH_CHECK_VALUE(grad_out.size(0) == a.B && grad_out.size(1) == a.M && grad_out.size(2) == row, msg("grad_out must have shape (", a.B, ", ", a.M, ", ", row, "), got ",
                    shape_of(grad_out)));
  check_same_device(planes, "planes", grad_out, "grad_out");
}

namespace {

// The forward's (B, M, out_row) output, rows in parallel.
at::Tensor run_forward(const Args& a, const at::Tensor& coords) {
  at::Tensor out = at::empty({a.B, a.M, out_row(a)}, coords.options());
  float* o = out.data_ptr<float>();
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.B * a.M, 256, [&](int64_t begin, int64_t end) {
      forward_range<T>(a, o, begin, end);
    });
  });
  return out;
}

at::Tensor forward_cpu(const at::Tensor& planes, const at::Tensor& coords, bool concat,
                       bool /*deterministic*/) {
  return run_forward(check_inputs(planes, coords, concat), coords);
}

// [the mean tri-plane features, extra] per row: the forward with the extra features copied in.
at::Tensor forward_extra_cpu(const at::Tensor& planes, const at::Tensor& coords, const at::Tensor& extra) {
  Args a = check_inputs(planes, coords, /*concat=*/false);
  check_extra(a, extra, planes);
  return run_forward(a, coords);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& planes,
                                                const at::Tensor& coords, bool concat,
                                                bool /*deterministic*/, bool planes_grad,
                                                bool coords_grad) {
  const Args a = check_inputs(planes, coords, concat);
  check_grad_out(a, grad_out, planes);
  const float* g = grad_out.data_ptr<float>();
  at::Tensor grad_coords = coords.new_empty({0});
  at::Tensor grad_planes = planes.new_empty({0});
  if (coords_grad) {
    grad_coords = at::empty_like(coords);
    float* gc = grad_coords.data_ptr<float>();
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      at::parallel_for(0, a.B * a.M, 256, [&](int64_t begin, int64_t end) {
        coord_grad_range<T>(a, g, gc, begin, end);
      });
    });
  }
  if (planes_grad) {
    at::Tensor buffer = at::zeros(planes.sizes(), planes.options().dtype(at::kFloat));
    float* gp = buffer.data_ptr<float>();
    // Bands of texel rows: enough tasks to balance the threads; each task scans all
    // points of its plane (locating a point is cheap next to a random texel access).
    const int64_t threads = at::get_num_threads();
    const int64_t want = std::max<int64_t>(1, (8 * threads + 3 * a.B - 1) / (3 * a.B));
    const int64_t bands = std::min(a.H, want);
    at::parallel_for(0, a.B * 3 * bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t band = task % bands, bt = task / bands;
        plane_grad_task(a, g, gp, bt / 3, static_cast<int>(bt % 3), band * a.H / bands,
                        (band + 1) * a.H / bands);
      }
    });
    grad_planes = planes.scalar_type() == at::kFloat ? buffer : buffer.to(planes.scalar_type());
  }
  return {grad_planes, grad_coords};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) {
  m.impl("triplane_sample_forward", &forward_cpu);
  m.impl("triplane_sample_forward_extra", &forward_extra_cpu);
  m.impl("triplane_sample_backward", &backward_cpu);
}

}  // namespace triplane
}  // namespace gpavatar
