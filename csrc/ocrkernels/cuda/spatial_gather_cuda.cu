// Spatial gather on CUDA: R[b, c, k] = sum_n softmax_n(s * P[b, k, n]) * F[b, c, n].
//
// Forward, deterministic, no atomics:
//   1. chunk_stats    one block per (chunk of kChunk pixels, image): per class row, the chunk's
//                     max of s * P and sum of exp(s * P - max), one warp per row.
//   2. chunk_partial  per (chunk, 64-channel tile, 64-class tile, image): the chunk's weighted
//                     sums O_j[c, k] = sum_n F[c, n] exp(s P[k, n] - m_j[k]), a tiled GEMM whose
//                     B operand (the weights) is computed while it is staged in shared memory.
//   3. combine_stats  per row: the chunks' statistics merged in chunk order (online-softmax
//                     merge of common/online_softmax.h), the split log-sum-exp (max, log sum)
//                     for backward, and each chunk's factor exp(m_j - m) / l.
//   4. combine_out    R[b, c, k] = sum_j O_j[c, k] * factor_j[k], in chunk order.
// Backward, recomputing the weights W from the saved (max, log sum):
//   1. bwd_d          D = dR^T . F per (64-pixel tile, 64-class tile), stored; and the tile's
//                     part of delta[k] = sum_n W[k, n] D[k, n], summed in a fixed order.
//   2. bwd_f          grad_F = dR . W per (64-pixel tile, 64-channel tile).
//   3. bwd_delta      delta[k] = the tiles' parts in tile order.
//   4. bwd_p          grad_P = s * W * (D - delta), element-wise.
// fp16 / bf16 are read and written as they are and accumulated in fp32; fp64 in fp64.
#include <torch/library.h>

#include <tuple>

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
    for (int64_t n = c0 + lane; n < c1; n += 32)
      l += exp_acc(s * static_cast<acc_t>(x[n]) - shift);
    l = warp_sum(l);
    if (lane == 0) {
      smax[(b * T + j) * K + k] = m;
      ssum[(b * T + j) * K + k] = l;
    }
  }
}

// grid (T * channel tiles, class tiles, B)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    chunk_partial_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ F,
                         int64_t K, int64_t C, int64_t N, int64_t T, acc_t s,
                         const acc_t* __restrict__ smax, acc_t* __restrict__ partial) {
  __shared__ acc_t As[kTK * kTM];
  __shared__ acc_t Bs[kTK * kTN];
  __shared__ acc_t chunk_max[kTN];  // the chunk's exp_shift per class
  const int64_t ctiles = ceil_div(C, kTM);
  const int64_t j = blockIdx.x / ctiles, c0 = (blockIdx.x % ctiles) * kTM;
  const int64_t k0 = int64_t(blockIdx.y) * kTN, b = blockIdx.z;
  const int64_t n0 = j * kChunk, nb = (n0 + kChunk < N ? n0 + kChunk : N) - n0;
  if (threadIdx.x < kTN && k0 + threadIdx.x < K)
    chunk_max[threadIdx.x] = exp_shift(smax[(b * T + j) * K + k0 + threadIdx.x]);
  __syncthreads();
  const scalar_t* Fb = F + b * C * N + n0;
  const scalar_t* Pb = P + b * K * N + n0;
  auto load_a = [&](int i, int64_t n) -> acc_t {
    return c0 + i < C ? static_cast<acc_t>(Fb[(c0 + i) * N + n]) : acc_t(0);
  };
  auto load_b = [&](int64_t n, int kk) -> acc_t {
    return k0 + kk < K ? exp_acc(s * static_cast<acc_t>(Pb[(k0 + kk) * N + n]) - chunk_max[kk])
                       : acc_t(0);
  };
  acc_t acc[4][4];
  zero_tile(acc);
  tile_mma(acc, nb, load_a, load_b, As, Bs);
  store_tile(acc, partial + (b * T + j) * C * K, K, c0, k0, C, K);
}

template <typename acc_t>
__global__ void combine_stats_kernel(const acc_t* __restrict__ smax, const acc_t* __restrict__ ssum,
                                     int64_t B, int64_t K, int64_t T, acc_t* __restrict__ lse,
                                     acc_t* __restrict__ factor) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // b * K + k
  if (row >= B * K) return;
  const int64_t b = row / K, k = row % K;
  SoftmaxStats<acc_t> total = {smax[b * T * K + k], ssum[b * T * K + k]};
  for (int64_t j = 1; j < T; ++j)
    total = merge(total, SoftmaxStats<acc_t>{smax[(b * T + j) * K + k], ssum[(b * T + j) * K + k]});
  lse[2 * row] = total.max;
  lse[2 * row + 1] = log_sum(total);
  for (int64_t j = 0; j < T; ++j)
    factor[(b * T + j) * K + k] = rescale(smax[(b * T + j) * K + k], total.max) / total.sum;
}

template <typename scalar_t, typename acc_t>
__global__ void combine_out_kernel(const acc_t* __restrict__ partial,
                                   const acc_t* __restrict__ factor, int64_t B, int64_t C,
                                   int64_t K, int64_t T, scalar_t* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b * C + c) * K + k
  if (idx >= B * C * K) return;
  const int64_t k = idx % K, c = (idx / K) % C, b = idx / (C * K);
  acc_t o = 0;
  for (int64_t j = 0; j < T; ++j)
    o += partial[((b * T + j) * C + c) * K + k] * factor[(b * T + j) * K + k];
  out[idx] = static_cast<scalar_t>(o);
}

// grid (pixel tiles, class tiles, B): D (K x N) = dR^T (K x C) . F (C x N).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bwd_d_kernel(const scalar_t* __restrict__ dR, const scalar_t* __restrict__ P,
                 const scalar_t* __restrict__ F, const acc_t* __restrict__ lse, int64_t K,
                 int64_t C, int64_t N, acc_t s, acc_t* __restrict__ D,
                 acc_t* __restrict__ delta_part) {
  __shared__ acc_t As[kTK * kTM];
  __shared__ acc_t Bs[kTK * kTN];
  const int64_t n0 = int64_t(blockIdx.x) * kTN, k0 = int64_t(blockIdx.y) * kTM, b = blockIdx.z;
  const int64_t tiles = gridDim.x;
  const scalar_t* dRb = dR + b * C * K;  // (C, K)
  const scalar_t* Fb = F + b * C * N;
  auto load_a = [&](int i, int64_t c) -> acc_t {
    return k0 + i < K ? static_cast<acc_t>(dRb[c * K + k0 + i]) : acc_t(0);
  };
  auto load_b = [&](int64_t c, int n) -> acc_t {
    return n0 + n < N ? static_cast<acc_t>(Fb[c * N + n0 + n]) : acc_t(0);
  };
  acc_t acc[4][4];
  zero_tile(acc);
  tile_mma(acc, C, load_a, load_b, As, Bs);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  // Each thread's part of sum_n W D for its 4 rows, then the 16 parts of a row in order.
  acc_t* red = As;  // kTM x 16 = kTK * kTM values; tile_mma ended with a barrier
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t k = k0 + ty * 4 + r;
    acc_t part = 0;
    if (k < K) {
      const acc_t m = lse[2 * (b * K + k)], logl = lse[2 * (b * K + k) + 1];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t n = n0 + tx * 4 + q;
        if (n < N) {
          const acc_t w =
              softmax_weight(s * static_cast<acc_t>(P[(b * K + k) * N + n]), m, logl);
          D[(b * K + k) * N + n] = acc[r][q];
          part += w * acc[r][q];
        }
      }
    }
    red[(ty * 4 + r) * 16 + tx] = part;
  }
  __syncthreads();
  if (threadIdx.x < kTM && k0 + threadIdx.x < K) {
    acc_t sum = 0;
    for (int t = 0; t < 16; ++t) sum += red[threadIdx.x * 16 + t];
    delta_part[(b * tiles + blockIdx.x) * K + k0 + threadIdx.x] = sum;
  }
}

// grid (pixel tiles, channel tiles, B): grad_F (C x N) = dR (C x K) . W (K x N).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bwd_f_kernel(const scalar_t* __restrict__ dR, const scalar_t* __restrict__ P,
                 const acc_t* __restrict__ lse, int64_t K, int64_t C, int64_t N, acc_t s,
                 scalar_t* __restrict__ gF) {
  __shared__ acc_t As[kTK * kTM];
  __shared__ acc_t Bs[kTK * kTN];
  const int64_t n0 = int64_t(blockIdx.x) * kTN, c0 = int64_t(blockIdx.y) * kTM, b = blockIdx.z;
  const scalar_t* dRb = dR + b * C * K;
  const scalar_t* Pb = P + b * K * N;
  const acc_t* lseb = lse + 2 * b * K;
  auto load_a = [&](int i, int64_t k) -> acc_t {
    return c0 + i < C ? static_cast<acc_t>(dRb[(c0 + i) * K + k]) : acc_t(0);
  };
  auto load_b = [&](int64_t k, int n) -> acc_t {
    if (n0 + n >= N) return acc_t(0);
    return softmax_weight(s * static_cast<acc_t>(Pb[k * N + n0 + n]), lseb[2 * k],
                          lseb[2 * k + 1]);
  };
  acc_t acc[4][4];
  zero_tile(acc);
  tile_mma(acc, K, load_a, load_b, As, Bs);
  store_tile(acc, gF + b * C * N, N, c0, n0, C, N);
}

template <typename acc_t>
__global__ void bwd_delta_kernel(const acc_t* __restrict__ delta_part, int64_t B, int64_t K,
                                 int64_t tiles, acc_t* __restrict__ delta) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= B * K) return;
  const int64_t b = row / K, k = row % K;
  acc_t sum = 0;
  for (int64_t t = 0; t < tiles; ++t) sum += delta_part[(b * tiles + t) * K + k];
  delta[row] = sum;
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_p_kernel(const scalar_t* __restrict__ P, const acc_t* __restrict__ lse,
                             const acc_t* __restrict__ D, const acc_t* __restrict__ delta,
                             int64_t rows, int64_t N, acc_t s, scalar_t* __restrict__ gP) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * N) return;
  const int64_t row = idx / N;
  const acc_t w = softmax_weight(s * static_cast<acc_t>(P[idx]), lse[2 * row], lse[2 * row + 1]);
  gP[idx] = static_cast<scalar_t>(s * softmax_input_grad(w, D[idx], delta[row]));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

std::tuple<at::Tensor, at::Tensor> spatial_gather_forward_cuda(const at::Tensor& probs,
                                                               const at::Tensor& feats,
                                                               double scale) {
  check_spatial_gather_args(probs, feats);
  check_cuda_tensor("spatial_gather", "probs", probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  const int64_t N = probs.size(2) * probs.size(3), T = ceil_div(N, kChunk);
  check_grid_yz("spatial_gather", ceil_div(K, kTN), B);
  const at::Tensor P = probs.contiguous(), F = feats.contiguous();
  const auto acc = acc_type_of(probs.scalar_type());
  const auto aopts = P.options().dtype(acc);
  at::Tensor smax = at::empty({B, T, K}, aopts), ssum = at::empty({B, T, K}, aopts);
  at::Tensor partial = at::empty({B, T, C, K}, aopts);
  at::Tensor factor = at::empty({B, T, K}, aopts);
  at::Tensor lse = at::empty({B, K, 2}, aopts);
  at::Tensor out = at::empty({B, C, K, 1}, P.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "spatial_gather", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t s = static_cast<acc_t>(scale);
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const scalar_t* f = F.const_data_ptr<scalar_t>();
    acc_t* mx = smax.mutable_data_ptr<acc_t>();
    acc_t* sm = ssum.mutable_data_ptr<acc_t>();
    chunk_stats_kernel<scalar_t, acc_t><<<dim3(T, B), kThreads, 0, stream>>>(p, K, N, T, s, mx, sm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(T * ceil_div(C, kTM)),
                    static_cast<unsigned>(ceil_div(K, kTN)), static_cast<unsigned>(B));
    chunk_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        p, f, K, C, N, T, s, mx, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_stats_kernel<acc_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        mx, sm, B, K, T, lse.mutable_data_ptr<acc_t>(), factor.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_out_kernel<scalar_t, acc_t><<<blocks_for(B * C * K), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), factor.const_data_ptr<acc_t>(), B, C, K, T,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
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
  const int64_t N = probs.size(2) * probs.size(3), tiles = ceil_div(N, kTN);
  check_grid_yz("spatial_gather_backward", ceil_div(std::max(K, C), kTM), B);
  const auto acc = acc_type_of(probs.scalar_type());
  const at::Tensor P = probs.contiguous(), F = feats.contiguous();
  const at::Tensor dR = grad_out.to(probs.scalar_type()).contiguous();  // (B, C, K, 1)
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const auto aopts = P.options().dtype(acc);
  at::Tensor D = at::empty({B, K, N}, aopts);
  at::Tensor delta_part = at::empty({B, tiles, K}, aopts), delta = at::empty({B, K}, aopts);
  at::Tensor gP = at::empty(probs.sizes(), P.options());
  at::Tensor gF = at::empty(feats.sizes(), P.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(),
                                  "spatial_gather_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t s = static_cast<acc_t>(scale);
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const scalar_t* f = F.const_data_ptr<scalar_t>();
    const scalar_t* dr = dR.const_data_ptr<scalar_t>();
    const acc_t* l = lse.const_data_ptr<acc_t>();
    bwd_d_kernel<scalar_t, acc_t>
        <<<dim3(tiles, ceil_div(K, kTM), B), kThreads, 0, stream>>>(
            dr, p, f, l, K, C, N, s, D.mutable_data_ptr<acc_t>(),
            delta_part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_f_kernel<scalar_t, acc_t><<<dim3(tiles, ceil_div(C, kTM), B), kThreads, 0, stream>>>(
        dr, p, l, K, C, N, s, gF.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_delta_kernel<acc_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        delta_part.const_data_ptr<acc_t>(), B, K, tiles, delta.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_p_kernel<scalar_t, acc_t><<<blocks_for(B * K * N), kThreads, 0, stream>>>(
        p, l, D.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), B * K, N, s,
        gP.mutable_data_ptr<scalar_t>());
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
