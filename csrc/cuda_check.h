// Torch-side CUDA glue shared by the <op>_cuda.cpp files.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace gpavatar {

// `err` is the cudaError_t (as int) a launcher returned.
inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace gpavatar
