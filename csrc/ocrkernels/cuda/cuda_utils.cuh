// Shared pieces of the CUDA kernels: launch helpers. There is no GEMM here: the CUDA ops hand
// their GEMMs to cuBLAS (torch.bmm / baddbmm through ATen).
//
// Headers are kept lean (ATen/core/Tensor.h and c10/cuda, not torch/extension.h) so that the
// CI compile check of every .cu for sm_80 and sm_90 stays fast. Every index that can reach
// B * C * N is int64_t. No reduction uses atomics: each block writes its own partial, and a
// later kernel reduces the partials in a fixed order, so two runs give the same bits.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/bn_relu.h"
#include "../common/macros.h"

namespace ocrkernels {
namespace cuda {

constexpr int kThreads = 256;

OCR_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// fp16 / bf16 accumulate in fp32, fp64 in fp64.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// gridDim.y and gridDim.z are limited to 65535.
inline void check_grid_yz(const char* op, int64_t y, int64_t z) {
  TORCH_CHECK(y <= 65535 && z <= 65535, op, ": shape too large for the CUDA grid (", y, ", ", z,
              " > 65535 tiles)");
}

}  // namespace cuda
}  // namespace ocrkernels
