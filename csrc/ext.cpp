// The gpavatar._C extension: operator schemas (TORCH_LIBRARY) and the shared
// input checks.  Device implementations register themselves next to their
// kernels (csrc/<op>/<op>_cpu.cpp, csrc/<op>/<op>_cuda.cpp).
#include <Python.h>
#include <cstdlib>
#include <torch/library.h>

#include "ops.h"

namespace gpavatar {

void check_float_tensor(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, msg(name, " must have shape ", shape, ", got ", shape_of(t)));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, msg(name, " must be float32, got ",
                   t.scalar_type()));
}

std::string shape_of(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) out += ", ";
    out += std::to_string(t.size(d));
  }
  return out + (t.dim() == 1 ? ",)" : ")");
}

std::string env_choice(const char* name, std::initializer_list<const char*> choices, const char* fallback) {
  const char* env = std::getenv(name);
  const std::string value = env == nullptr || env[0] == '\0' ? fallback : env;
  std::string listed;
  size_t i = 0;
  for (const char* c : choices) {
    if (value == c) return value;
    listed += (i == 0 ? "" : (i + 1 == choices.size() ? " or " : ", "));
    listed += c;
    ++i;
  }
  TORCH_CHECK_VALUE(false, msg(name, " must be ", listed, ", got '", value, "'"));
  return value;
}

void check_grid_batch(int64_t B, const char* name) {
  TORCH_CHECK_VALUE(B <= 65535, msg(name, ": batch size B must be <= 65535, got ", B));
}

void check_contiguous_float(const at::Tensor& t, const char* name, int64_t dim,
                            const char* shape) {
  check_float_tensor(t, name, dim, shape);
  TORCH_CHECK_VALUE(t.is_contiguous(), msg(name, " must be contiguous"));
}

void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                       const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), msg(name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device()));
}

}  // namespace gpavatar

TORCH_LIBRARY(gpavatar, m) {
  m.def("knn(Tensor queries, Tensor points, int K) -> (Tensor dist2, Tensor idx)");
  m.def("knn_index(Tensor points, Tensor query_box, int K) -> Tensor[]");
  m.def("knn_search(Tensor queries, Tensor points, int K, Tensor[] index) -> (Tensor dist2, Tensor idx)");
  // Whether knn on these points' device searches the cell lists an index holds (the knn policy,
  // GPAVATAR_KNN*, read here so that Python does not parse it again).
  m.def("knn_index_applies(Tensor points) -> bool");
  // A block of calls whose CPU cell lists are kept for calls on the same points (see ops.h).
  m.def("knn_cpu_list_cache(bool on) -> int", &gpavatar::knn::knn_cpu_list_cache);
  m.def(
      "knn_blend_forward(Tensor queries, Tensor points, Tensor dist2, Tensor idx, "
      "Tensor table, Tensor w1_dir, Tensor w2, Tensor b2, Tensor? weight_sum, float eps) "
      "-> Tensor");
  m.def(
      "knn_blend_backward(Tensor grad_out, Tensor queries, Tensor points, Tensor dist2, "
      "Tensor idx, Tensor table, Tensor w1_dir, Tensor w2, Tensor? weight_sum, float eps) "
      "-> (Tensor grad_table, Tensor grad_w1_dir, Tensor grad_w2, Tensor grad_b2)");
  m.def(
      "triplane_sample_forward(Tensor planes, Tensor coords, bool concat, bool deterministic) "
      "-> Tensor");
  // Forward only (inference): [mean tri-plane features (C), extra (E)] per row, (B, M, C + E).
  m.def("triplane_sample_forward_extra(Tensor planes, Tensor coords, Tensor extra) -> Tensor");
  m.def(
      "triplane_sample_backward(Tensor grad_out, Tensor planes, Tensor coords, bool concat, "
      "bool deterministic, bool planes_grad, bool coords_grad) "
      "-> (Tensor grad_planes, Tensor grad_coords)");
  m.def(
      "ray_box(Tensor origins, Tensor dirs, float box_min, float box_max) "
      "-> (Tensor t0, Tensor t1, Tensor hit)");
  m.def("stratified_depths(Tensor t0, Tensor t1, int S, Tensor? jitter) -> Tensor");
  m.def("importance_depths(Tensor depths, Tensor weights, int n, Tensor? offset) -> Tensor");
  m.def("merge_samples(Tensor depths_a, Tensor depths_b) -> (Tensor depths, Tensor order)");
  m.def(
      "composite_forward(Tensor alphas, Tensor values, Tensor? depths) "
      "-> (Tensor color, Tensor opacity, Tensor weights, Tensor depth)");
  m.def(
      "composite_merged_forward(Tensor alphas_a, Tensor values_a, Tensor alphas_b, Tensor values_b, "
      "Tensor order, Tensor? depths) -> (Tensor color, Tensor opacity, Tensor weights, Tensor depth)");
  m.def(
      "composite_backward(Tensor grad_color, Tensor grad_opacity, Tensor grad_weights, "
      "Tensor grad_depth, Tensor alphas, Tensor values, Tensor? depths) "
      "-> (Tensor grad_alphas, Tensor grad_values)");
}

// `import gpavatar._C` loads the library (registering the operators above);
// the module itself exposes only build facts.
static PyMethodDef kMethods[] = {{nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
#if defined(WITH_CUDA)
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
