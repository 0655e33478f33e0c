// Ray sampling on the CPU (and the input checks every device shares), with the
// per-ray arithmetic of rays.h; parallel over rays.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops.h"
#include "rays/rays.h"

namespace gpavatar {
namespace rays {

void check_ray_box(const at::Tensor& origins, const at::Tensor& dirs, double lo, double hi) {
  check_contiguous_float(origins, "origins", 2, "(R, 3)");
  check_contiguous_float(dirs, "dirs", 2, "(R, 3)");
  TORCH_CHECK_VALUE(origins.size(1) == 3, msg("origins must have shape (R, 3), got ", shape_of(origins)));
  TORCH_CHECK_VALUE(dirs.sizes() == origins.sizes(), msg("dirs must have shape ", shape_of(origins),
                    " like origins, got ", shape_of(dirs)));
  // The kernels compute in float32: the bounds must be finite there (an infinite box
  // gives no finite entry / exit; every ray would miss).
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(lo)) && std::isfinite(static_cast<float>(hi)),
                    msg("box_min and box_max must be finite float32 numbers, got ", lo, " and ", hi));
  TORCH_CHECK_VALUE(lo < hi, msg("box_min must be < box_max, got ", lo, " and ", hi));
  check_same_device(origins, "origins", dirs, "dirs");
}

void check_stratified(const at::Tensor& t0, const at::Tensor& t1, int64_t S,
                      const std::optional<at::Tensor>& u) {
  check_contiguous_float(t0, "t0", 1, "(R,)");
  check_contiguous_float(t1, "t1", 1, "(R,)");
  TORCH_CHECK_VALUE(t1.size(0) == t0.size(0), msg("t1 must have shape (", t0.size(0), ",), got ",
                    shape_of(t1)));
  TORCH_CHECK_VALUE(S >= 1, msg("S must be >= 1, got ", S));
  check_same_device(t0, "t0", t1, "t1");
  if (u.has_value()) {
    check_contiguous_float(*u, "jitter", 2, "(R, S + 1)");
    TORCH_CHECK_VALUE(u->size(0) == t0.size(0) && u->size(1) == S + 1, msg("jitter must have shape (",
                      t0.size(0), ", ", S + 1, "), got ", shape_of(*u)));
    check_same_device(t0, "t0", *u, "jitter");
  }
}

void check_importance(const at::Tensor& t, const at::Tensor& w, int64_t n,
                      const std::optional<at::Tensor>& offset) {
  check_contiguous_float(t, "depths", 2, "(R, S)");
  check_contiguous_float(w, "weights", 2, "(R, S)");
  TORCH_CHECK_VALUE(w.sizes() == t.sizes(), msg("weights must have the shape of depths ", shape_of(t),
                    ", got ", shape_of(w)));
  TORCH_CHECK_VALUE(t.size(1) >= 2, msg("depths must have shape (R, S) with S >= 2, got ", shape_of(t)));
  TORCH_CHECK_VALUE(n >= 2, msg("n must be >= 2, got ", n));
  check_same_device(t, "depths", w, "weights");
  if (offset.has_value()) {
    check_contiguous_float(*offset, "offset", 1, "(R,)");
    TORCH_CHECK_VALUE(offset->size(0) == t.size(0), msg("offset must have shape (", t.size(0),
                      ",), got ", shape_of(*offset)));
    check_same_device(t, "depths", *offset, "offset");
  }
}

void check_merge(const at::Tensor& a, const at::Tensor& b) {
  check_contiguous_float(a, "depths_a", 2, "(R, Sa)");
  check_contiguous_float(b, "depths_b", 2, "(R, Sb)");
  TORCH_CHECK_VALUE(b.size(0) == a.size(0), msg("depths_b must have shape (", a.size(0),
                    ", Sb), got ", shape_of(b)));
  check_same_device(a, "depths_a", b, "depths_b");
}

namespace {

constexpr int64_t kGrain = 1024;

std::tuple<at::Tensor, at::Tensor, at::Tensor> ray_box_cpu(const at::Tensor& origins,
                                                           const at::Tensor& dirs, double lo,
                                                           double hi) {
  check_ray_box(origins, dirs, lo, hi);
  const int64_t R = origins.size(0);
  at::Tensor t0 = at::empty({R}, origins.options()), t1 = at::empty({R}, origins.options());
  at::Tensor hit = at::empty({R}, origins.options().dtype(at::kBool));
  const float *o = origins.data_ptr<float>(), *d = dirs.data_ptr<float>();
  float *a = t0.data_ptr<float>(), *b = t1.data_ptr<float>();
  bool* h = hit.data_ptr<bool>();
  at::parallel_for(0, R, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      h[r] = ray_box(o + 3 * r, d + 3 * r, static_cast<float>(lo), static_cast<float>(hi), a + r,
                     b + r);
  });
  return {t0, t1, hit};
}

at::Tensor stratified_cpu(const at::Tensor& t0, const at::Tensor& t1, int64_t S,
                          const std::optional<at::Tensor>& u) {
  check_stratified(t0, t1, S, u);
  const int64_t R = t0.size(0);
  at::Tensor out = at::empty({R, S}, t0.options());
  const float *a = t0.data_ptr<float>(), *b = t1.data_ptr<float>();
  const float* jitter = u.has_value() ? u->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      stratified(a[r], b[r], S, jitter != nullptr ? jitter + r * (S + 1) : nullptr, o + r * S);
  });
  return out;
}

at::Tensor importance_cpu(const at::Tensor& t, const at::Tensor& w, int64_t n,
                          const std::optional<at::Tensor>& offset) {
  check_importance(t, w, n, offset);
  const int64_t R = t.size(0), S = t.size(1);
  at::Tensor out = at::empty({R, n}, t.options());
  const float *tp = t.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* off = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / S), [&](int64_t begin, int64_t end) {
    std::vector<float> cdf(S);
    for (int64_t r = begin; r < end; ++r)
      importance(tp + r * S, wp + r * S, S, n, off != nullptr ? off[r] : 0.5f, cdf.data(),
                 o + r * n);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_merge(a, b);
  const int64_t R = a.size(0), Sa = a.size(1), Sb = b.size(1);
  at::Tensor out = at::empty({R, Sa + Sb}, a.options());
  at::Tensor order = at::empty({R, Sa + Sb}, a.options().dtype(at::kLong));
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* o = out.data_ptr<float>();
  int64_t* ord = order.data_ptr<int64_t>();
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / (Sa + Sb + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      merge(ap + r * Sa, Sa, bp + r * Sb, Sb, o + r * (Sa + Sb), ord + r * (Sa + Sb));
  });
  return {out, order};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpavatar, CPU, m) {
  m.impl("ray_box", &ray_box_cpu);
  m.impl("stratified_depths", &stratified_cpu);
  m.impl("importance_depths", &importance_cpu);
  m.impl("merge_samples", &merge_cpu);
}

}  // namespace rays
}  // namespace gpavatar
