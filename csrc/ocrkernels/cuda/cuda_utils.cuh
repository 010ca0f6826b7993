// Shared pieces of the CUDA kernels: launch helpers and one tiled GEMM building block.
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
// Output tile of the GEMM block: 64 x 64, 16 x 16 threads with 4 x 4 outputs each; the
// reduction dimension is staged through shared memory 16 at a time.
constexpr int kTM = 64;
constexpr int kTN = 64;
constexpr int kTK = 16;

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

// acc (4 x 4 per thread) += A (kTM x depth) . B (depth x kTN) for one output tile, reading the
// operands through load_a(i, j) and load_b(j, n) (tile-local i, n; global j), which return 0
// outside the matrices and may compute their value on the fly (a softmax weight, a conversion
// from fp16). As and Bs are kTK * kTM and kTK * kTN shared arrays. The sum over j runs in a
// fixed order for every output, so the result is deterministic.
template <typename acc_t, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_mma(acc_t (&acc)[4][4], int64_t depth, const LoadA& load_a,
                                         const LoadB& load_b, acc_t* As, acc_t* Bs) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  for (int64_t j0 = 0; j0 < depth; j0 += kTK) {
    for (int e = tid; e < kTK * kTM; e += kThreads) {
      const int jj = e / kTM, i = e % kTM;
      As[jj * kTM + i] = j0 + jj < depth ? load_a(i, j0 + jj) : acc_t(0);
    }
    for (int e = tid; e < kTK * kTN; e += kThreads) {
      const int jj = e / kTN, n = e % kTN;
      Bs[jj * kTN + n] = j0 + jj < depth ? load_b(j0 + jj, n) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kTK; ++jj) {
      acc_t a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[jj * kTM + ty * 4 + r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = Bs[jj * kTN + tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
}

template <typename acc_t>
__device__ __forceinline__ void zero_tile(acc_t (&acc)[4][4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = acc_t(0);
}

// Stores this thread's 4 x 4 tile of a kTM x kTN block whose top-left element is (r0, c0): the
// elements inside R rows and C columns, at out[row * ld + col], converted to out_t.
template <typename acc_t, typename out_t>
__device__ __forceinline__ void store_tile(const acc_t (&acc)[4][4], out_t* out, int64_t ld,
                                           int64_t r0, int64_t c0, int64_t R, int64_t C) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = r0 + ty * 4 + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t col = c0 + tx * 4 + c;
      if (row < R && col < C) out[row * ld + col] = static_cast<out_t>(acc[r][c]);
    }
  }
}

}  // namespace cuda
}  // namespace ocrkernels
