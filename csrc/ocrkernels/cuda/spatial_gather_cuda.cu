// Spatial gather on CUDA: R[b, c, k] = sum_n softmax_n(s * P[b, k, n]) * F[b, c, n].
//
// The softmax statistics are this file's kernels (deterministic, no atomics); every GEMM is
// handed to cuBLAS through ATen (tensor cores for fp16 / bf16; fp32 as torch.bmm runs it, TF32
// only where torch.backends.cuda.matmul.allow_tf32 allows it).
// Forward:
//   1. chunk_stats    one block per (chunk of kChunk pixels, image): per class row, the chunk's
//                     max of s * P and sum of exp(s * P - max), one warp per row.
//   2. combine_stats  per row: the chunks' statistics merged in chunk order (online-softmax
//                     merge of common/online_softmax.h) into the split log-sum-exp (max, log
//                     sum), the only thing kept for backward.
//   3. weights        W[b, k, n] = exp(s P - max - log sum) (common/online_softmax.h), in the
//                     input dtype.
//   4. R = F . W^T    torch.bmm, (B, C, N) x (B, N, K).
// Backward, recomputing W from the saved (max, log sum):
//   grad_F = dR . W (bmm); D = dR^T . F (bmm, then float32); delta[k] = sum_n W[k, n] D[k, n]
//   (torch.sum: a fixed-order reduction); grad_P = s * W * (D - delta), element-wise, W read
//   back for float32 / float64 and recomputed in float32 for fp16 / bf16
//   (common/online_softmax.h's softmax_input_grad).
// fp16 / bf16 maps and products with fp32 accumulation (cuBLAS) and fp32 statistics; fp64 in
// fp64. Non-finite numbers: NaN and inf in P or F reach R and the gradients as in the
// reference (exp_shift keeps a row of -inf at weight 0, not NaN).
#include <ATen/ops/bmm.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../common/online_softmax.h"
#include "cuda_utils.cuh"

namespace ocrkernels {
namespace cuda {
namespace {

constexpr int64_t kChunk = 4096;  // pixels per forward chunk

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    const acc_t o = __shfl_xor_sync(0xffffffffu, v, d);
    v = o > v ? o : v;
  }
  return v;
}

// Butterfly sum: every lane ends with the same value, in the same order on every run.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    chunk_stats_kernel(const scalar_t* __restrict__ P, int64_t K, int64_t N, int64_t T, acc_t s,
                       acc_t* __restrict__ smax, acc_t* __restrict__ ssum) {
  const int64_t j = blockIdx.x, b = blockIdx.y;
  const int64_t c0 = j * kChunk, c1 = c0 + kChunk < N ? c0 + kChunk : N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t k = warp; k < K; k += kThreads / 32) {
    const scalar_t* x = P + (b * K + k) * N;
    acc_t m = empty_stats<acc_t>().max;
    for (int64_t n = c0 + lane; n < c1; n += 32) {
      const acc_t v = s * static_cast<acc_t>(x[n]);
      m = v > m ? v : m;
    }
    m = warp_max(m);
    acc_t l = 0;
    const acc_t shift = exp_shift(m);
    // A pointer walk, not x[n]: with the index form ptxas keeps one more 64-bit value live
    // around double exp's out-of-line path and spills it (8 bytes, sm_90, fp64).
    const scalar_t* end = x + c1;
    for (const scalar_t* q = x + c0 + lane; q < end; q += 32)
      l += exp_acc(s * static_cast<acc_t>(*q) - shift);
    l = warp_sum(l);
    if (lane == 0) {
      smax[(b * T + j) * K + k] = m;
      ssum[(b * T + j) * K + k] = l;
    }
  }
}

template <typename acc_t>
__global__ void combine_stats_kernel(const acc_t* __restrict__ smax, const acc_t* __restrict__ ssum,
                                     int64_t B, int64_t K, int64_t T, acc_t* __restrict__ lse) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // b * K + k
  if (row >= B * K) return;
  const int64_t b = row / K, k = row % K;
  SoftmaxStats<acc_t> total = {smax[b * T * K + k], ssum[b * T * K + k]};
  for (int64_t j = 1; j < T; ++j)
    total = merge(total, SoftmaxStats<acc_t>{smax[(b * T + j) * K + k], ssum[(b * T + j) * K + k]});
  lse[2 * row] = total.max;
  lse[2 * row + 1] = log_sum(total);
}

// W[row, n] = softmax weight of s * P[row, n] under the row's (max, log sum), rows = B * K.
template <typename scalar_t, typename acc_t>
__global__ void weights_kernel(const scalar_t* __restrict__ P, const acc_t* __restrict__ lse,
                               int64_t rows, int64_t N, acc_t s, scalar_t* __restrict__ W) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * N) return;
  const int64_t row = idx / N;
  W[idx] = static_cast<scalar_t>(
      softmax_weight(s * static_cast<acc_t>(P[idx]), lse[2 * row], lse[2 * row + 1]));
}

// W: the weights the GEMMs used, in the input dtype. Where that is the accumulation dtype
// (float32, float64) they are the exact values and are read back; fp16 / bf16 recompute them
// in float32 from lse rather than use their rounded copy.
template <typename scalar_t, typename acc_t>
__global__ void bwd_p_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ W,
                             const acc_t* __restrict__ lse, const acc_t* __restrict__ D,
                             const acc_t* __restrict__ delta, int64_t rows, int64_t N, acc_t s,
                             scalar_t* __restrict__ gP) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * N) return;
  const int64_t row = idx / N;
  acc_t w;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    w = W[idx];
  } else {
    w = softmax_weight(s * static_cast<acc_t>(P[idx]), lse[2 * row], lse[2 * row + 1]);
  }
  gP[idx] = static_cast<scalar_t>(s * softmax_input_grad(w, D[idx], delta[row]));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

// The (max, log sum) of every class row: lse (B, K, 2) in the accumulation dtype.
at::Tensor row_statistics(const at::Tensor& P, double scale) {
  const int64_t B = P.size(0), K = P.size(1), N = P.size(2) * P.size(3), T = ceil_div(N, kChunk);
  const auto aopts = P.options().dtype(acc_type_of(P.scalar_type()));
  at::Tensor smax = at::empty({B, T, K}, aopts), ssum = at::empty({B, T, K}, aopts);
  at::Tensor lse = at::empty({B, K, 2}, aopts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "spatial_gather", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acc_t* mx = smax.mutable_data_ptr<acc_t>();
    acc_t* sm = ssum.mutable_data_ptr<acc_t>();
    chunk_stats_kernel<scalar_t, acc_t><<<dim3(T, B), kThreads, 0, stream>>>(
        P.const_data_ptr<scalar_t>(), K, N, T, static_cast<acc_t>(scale), mx, sm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_stats_kernel<acc_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        mx, sm, B, K, T, lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lse;
}

// The softmax weights W (B, K, N) in the dtype of P, from lse.
at::Tensor softmax_weights(const at::Tensor& P, const at::Tensor& lse, double scale) {
  const int64_t B = P.size(0), K = P.size(1), N = P.size(2) * P.size(3);
  at::Tensor W = at::empty({B, K, N}, P.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "spatial_gather", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    weights_kernel<scalar_t, acc_t><<<blocks_for(B * K * N), kThreads, 0, current_stream()>>>(
        P.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), B * K, N,
        static_cast<acc_t>(scale), W.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return W;
}

std::tuple<at::Tensor, at::Tensor> spatial_gather_forward_cuda(const at::Tensor& probs,
                                                               const at::Tensor& feats,
                                                               double scale) {
  check_spatial_gather_args(probs, feats);
  check_cuda_tensor("spatial_gather", "probs", probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  const int64_t N = probs.size(2) * probs.size(3);
  check_grid_yz("spatial_gather", B, 1);  // chunk_stats: grid (chunks, B)
  const at::Tensor P = probs.contiguous();
  const at::Tensor lse = row_statistics(P, scale);
  const at::Tensor W = softmax_weights(P, lse, scale);
  const at::Tensor F = feats.contiguous().view({B, C, N});
  return {at::bmm(F, W.transpose(1, 2)).view({B, C, K, 1}), lse};
}

std::tuple<at::Tensor, at::Tensor> spatial_gather_backward_cuda(const at::Tensor& grad_out,
                                                                const at::Tensor& probs,
                                                                const at::Tensor& feats,
                                                                const at::Tensor& lse_in,
                                                                double scale) {
  check_spatial_gather_backward_args(grad_out, probs, feats, lse_in);
  check_cuda_tensor("spatial_gather_backward", "probs", probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  const int64_t N = probs.size(2) * probs.size(3);
  const auto acc = acc_type_of(probs.scalar_type());
  const at::Tensor P = probs.contiguous();
  const at::Tensor F = feats.contiguous().view({B, C, N});
  const at::Tensor dR = grad_out.to(probs.scalar_type()).reshape({B, C, K});
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor W = softmax_weights(P, lse, scale);
  at::Tensor gF = at::bmm(dR, W).view(feats.sizes());
  const at::Tensor D = at::bmm(dR.transpose(1, 2), F).to(acc).contiguous();  // (B, K, N)
  const at::Tensor delta = D.mul(W).sum(at::IntArrayRef{-1}).contiguous();  // (B, K), fixed order
  at::Tensor gP = at::empty(probs.sizes(), P.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(),
                                  "spatial_gather_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_p_kernel<scalar_t, acc_t><<<blocks_for(B * K * N), kThreads, 0, current_stream()>>>(
        P.const_data_ptr<scalar_t>(), W.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
        D.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), B * K, N,
        static_cast<acc_t>(scale), gP.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gP, gF};
}

at::Tensor spatial_gather_cuda(const at::Tensor& probs, const at::Tensor& feats, double scale) {
  return std::get<0>(spatial_gather_forward_cuda(probs, feats, scale));
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m) {
  m.impl("spatial_gather", &cuda::spatial_gather_cuda);
  m.impl("spatial_gather_forward", &cuda::spatial_gather_forward_cuda);
  m.impl("spatial_gather_backward", &cuda::spatial_gather_backward_cuda);
}

}  // namespace ocrkernels
