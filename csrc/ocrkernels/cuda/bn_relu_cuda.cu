// Training-mode BatchNorm + ReLU passes of the training-mode attention on CUDA (schemas in
// ops.cpp; CPU twins in cpu/bn_relu_cpu.cpp). The chain's GEMMs run in cuBLAS (torch.matmul in
// ocrkernels/attention_train.py): the pixel_matmul ops have CPU kernels only. The per-element
// arithmetic is common/bn_relu.h (bn_act rounds exactly as on the CPU, so the ReLU masks agree
// with the CPU's bit for bit) and the statistics merge common/bn_stats.h. Reductions: one block per (image, channel) row writes its partial
// from a fixed-shape tree; the rows of a channel are then combined in batch order. The in-place
// twins (bn_relu_inplace, bn_relu_backward_apply_inplace) write into a contiguous map the
// caller owns.
#include <torch/library.h>

#include <tuple>

#include "../common/bn_stats.h"
#include "../common/checks.h"
#include "cuda_utils.cuh"

namespace ocrkernels {
namespace cuda {
namespace {

// Sums `vals` (kThreads per value slot, nv slots) across the block in a fixed tree; slot v of
// thread 0 ends with the total. red holds nv * kThreads doubles.
template <int nv>
__device__ __forceinline__ void block_sum(double (&vals)[nv], double* red) {
  for (int v = 0; v < nv; ++v) red[v * kThreads + threadIdx.x] = vals[v];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      for (int v = 0; v < nv; ++v)
        red[v * kThreads + threadIdx.x] += red[v * kThreads + threadIdx.x + stride];
    __syncthreads();
  }
  for (int v = 0; v < nv; ++v) vals[v] = red[v * kThreads];
}

// h may be z itself (bn_relu_inplace): each thread reads its element before writing it.
template <typename T>
__global__ void bn_relu_kernel(const T* z, const T* __restrict__ mean,
                               const T* __restrict__ scale, const T* __restrict__ beta,
                               int64_t total, int64_t ch, int64_t N, T* h) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = (idx / N) % ch;
  h[idx] = bn_relu_apply(z[idx], mean[c], scale[c], beta[c]);
}

// One block per row (b, c): partial[b, 0, c] = sum g, partial[b, 1, c] = sum g * xhat.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_sums_kernel(const T* __restrict__ dh, const T* __restrict__ z, const T* __restrict__ mean,
                     const T* __restrict__ invstd, const T* __restrict__ scale,
                     const T* __restrict__ beta, int64_t ch, int64_t N, T* __restrict__ partial) {
  __shared__ double red[2 * kThreads];
  const int64_t row = blockIdx.x, b = row / ch, c = row % ch;
  const T m = mean[c], is = invstd[c], s = scale[c], be = beta[c];
  double sums[2] = {0.0, 0.0};
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const T zv = z[row * N + n];
    const T g = bn_relu_masked_grad(dh[row * N + n], zv, m, s, be);
    sums[0] += g;
    sums[1] += g * bn_xhat(zv, m, is);
  }
  block_sum(sums, red);
  if (threadIdx.x == 0) {
    partial[(b * 2 + 0) * ch + c] = static_cast<T>(sums[0]);
    partial[(b * 2 + 1) * ch + c] = static_cast<T>(sums[1]);
  }
}

// sums[v, c] = sum over b, in batch order, of partial[b, v, c].
template <typename T>
__global__ void batch_order_sum_kernel(const T* __restrict__ partial, int64_t B, int64_t width,
                                       T* __restrict__ sums) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= width) return;
  T s = partial[i];
  for (int64_t b = 1; b < B; ++b) s += partial[b * width + i];
  sums[i] = s;
}

// dz may be dh itself (bn_relu_backward_apply_inplace).
template <typename T>
__global__ void grad_apply_kernel(const T* dh, const T* __restrict__ z,
                                  const T* __restrict__ mean, const T* __restrict__ invstd,
                                  const T* __restrict__ scale, const T* __restrict__ beta,
                                  const T* __restrict__ sums, double count, int64_t total,
                                  int64_t ch, int64_t N, T* dz) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = (idx / N) % ch;
  // Rounded to T as the CPU kernel does, before the element-wise formula.
  const T mean_g = static_cast<T>(sums[c] / count), mean_gx = static_cast<T>(sums[ch + c] / count);
  const T g = bn_relu_masked_grad(dh[idx], z[idx], mean[c], scale[c], beta[c]);
  dz[idx] = bn_input_grad(g, z[idx], mean[c], invstd[c], scale[c], mean_g, mean_gx);
}

// One block per row: (mean, M2) from sums shifted by the row's first value.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_moments_kernel(const T* __restrict__ z, int64_t N, double* __restrict__ row_mean,
                       double* __restrict__ row_m2) {
  __shared__ double red[2 * kThreads];
  const int64_t row = blockIdx.x;
  const T* x = z + row * N;
  const T shift = static_cast<T>(moments_shift(x[0]));
  double sums[2] = {0.0, 0.0};
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const double d = static_cast<double>(x[n] - shift);
    sums[0] += d;
    sums[1] += d * d;
  }
  block_sum(sums, red);
  if (threadIdx.x == 0) {
    const Moments m = moments_from_shifted_sums(double(shift), sums[0], sums[1], double(N));
    row_mean[row] = m.mean;
    row_m2[row] = m.m2;
  }
}

// Per channel: the rows merged in batch order (Chan et al.), as the CPU kernel does.
template <typename T>
__global__ void merge_moments_kernel(const double* __restrict__ row_mean,
                                     const double* __restrict__ row_m2, int64_t B, int64_t ch,
                                     int64_t N, T* __restrict__ var, T* __restrict__ mean) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= ch) return;
  Moments total{double(N), row_mean[c], row_m2[c]};
  for (int64_t b = 1; b < B; ++b)
    total = merge_moments(total, {double(N), row_mean[b * ch + c], row_m2[b * ch + c]});
  mean[c] = static_cast<T>(total.mean);
  var[c] = static_cast<T>(biased_variance(total));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

BnDims check_bn_relu_cuda(const char* op, const at::Tensor& z, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& beta) {
  const BnDims d = check_bn_map(op, z, "z");
  check_bn_like(op, mean, "mean", {d.ch}, z);
  check_bn_like(op, scale, "scale", {d.ch}, z);
  check_bn_like(op, beta, "beta", {d.ch}, z);
  check_cuda_tensor(op, "z", z);
  return d;
}

// h = relu(bn(z)); h is contiguous and may be z itself.
void bn_relu_fill(const BnDims& d, const at::Tensor& z_in, const at::Tensor& mean_in,
                  const at::Tensor& scale_in, const at::Tensor& beta_in, at::Tensor& h) {
  const at::Tensor z = z_in.contiguous(), mean = mean_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  const int64_t total = z.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu", [&] {
    bn_relu_kernel<scalar_t><<<blocks_for(total), kThreads, 0, current_stream()>>>(
        z.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), total, d.ch, d.N,
        h.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_relu_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& beta) {
  const BnDims d = check_bn_relu_cuda("bn_relu", z, mean, scale, beta);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor h = at::empty(z.sizes(), z.options());
  bn_relu_fill(d, z, mean, scale, beta, h);
  return h;
}

void bn_relu_inplace_cuda(at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                          const at::Tensor& beta) {
  const BnDims d = check_bn_relu_cuda("bn_relu_inplace", z, mean, scale, beta);
  check_writable_map("bn_relu_inplace", z, "z", {&mean, &scale, &beta});
  const c10::cuda::CUDAGuard guard(z.device());
  bn_relu_fill(d, z, mean, scale, beta, z);
}

at::Tensor bn_relu_backward_reduce_cuda(const at::Tensor& dh_in, const at::Tensor& z_in,
                                        const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                        const at::Tensor& scale_in, const at::Tensor& beta_in) {
  const char* op = "bn_relu_backward_reduce";
  check_bn_backward(op, dh_in, z_in, mean_in, invstd_in, scale_in, beta_in);
  check_cuda_tensor(op, "z", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const BnDims d{z_in.size(0), z_in.size(1), z_in.size(2)};
  const at::Tensor dh = dh_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor partial = at::empty({d.B, 2, d.ch}, z.options());
  at::Tensor sums = at::empty({2, d.ch}, z.options());
  if (d.B * d.ch == 0) return sums.zero_();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_backward_reduce", [&] {
    grad_sums_kernel<scalar_t><<<static_cast<unsigned>(d.B * d.ch), kThreads, 0, stream>>>(
        dh.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), d.ch, d.N,
        partial.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch_order_sum_kernel<scalar_t><<<blocks_for(2 * d.ch), kThreads, 0, stream>>>(
        partial.const_data_ptr<scalar_t>(), d.B, 2 * d.ch, sums.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sums;
}

// dz of relu(bn(z)) into dz (contiguous, the shape of z; it may be dh itself).
void bn_relu_backward_apply_fill(const at::Tensor& dh_in, const at::Tensor& z_in,
                                 const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                 const at::Tensor& scale_in, const at::Tensor& beta_in,
                                 const at::Tensor& sums_in, double count, at::Tensor& dz) {
  const BnDims d{z_in.size(0), z_in.size(1), z_in.size(2)};
  const at::Tensor dh = dh_in.contiguous(), z = z_in.contiguous(), sums = sums_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  const int64_t total = z.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_backward_apply", [&] {
    grad_apply_kernel<scalar_t><<<blocks_for(total), kThreads, 0, current_stream()>>>(
        dh.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        scale.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
        sums.const_data_ptr<scalar_t>(), count, total, d.ch, d.N,
        dz.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_relu_backward_apply_cuda(const at::Tensor& dh, const at::Tensor& z,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const at::Tensor& scale, const at::Tensor& beta,
                                       const at::Tensor& sums, double count) {
  const char* op = "bn_relu_backward_apply";
  check_bn_backward_apply(op, dh, z, mean, invstd, scale, beta, sums, count);
  check_cuda_tensor(op, "z", z);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor dz = at::empty(z.sizes(), z.options());
  bn_relu_backward_apply_fill(dh, z, mean, invstd, scale, beta, sums, count, dz);
  return dz;
}

void bn_relu_backward_apply_inplace_cuda(at::Tensor& dh, const at::Tensor& z,
                                         const at::Tensor& mean, const at::Tensor& invstd,
                                         const at::Tensor& scale, const at::Tensor& beta,
                                         const at::Tensor& sums, double count) {
  const char* op = "bn_relu_backward_apply_inplace";
  check_bn_backward_apply(op, dh, z, mean, invstd, scale, beta, sums, count);
  check_writable_map(op, dh, "dh", {&z, &mean, &invstd, &scale, &beta, &sums});
  check_cuda_tensor(op, "z", z);
  const c10::cuda::CUDAGuard guard(z.device());
  bn_relu_backward_apply_fill(dh, z, mean, invstd, scale, beta, sums, count, dh);
}

std::tuple<at::Tensor, at::Tensor> batch_var_mean_cuda(const at::Tensor& z_in) {
  const BnDims d = check_bn_map("batch_var_mean", z_in, "z");
  TORCH_CHECK(d.B * d.N > 0, "batch_var_mean: z must have at least one value per channel, got ",
              z_in.sizes());
  check_cuda_tensor("batch_var_mean", "z", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  at::Tensor var = at::empty({d.ch}, z.options()), mean = at::empty({d.ch}, z.options());
  if (d.ch == 0) return {var, mean};
  const auto dopts = z.options().dtype(at::kDouble);
  at::Tensor row_mean = at::empty({d.B, d.ch}, dopts), row_m2 = at::empty({d.B, d.ch}, dopts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "batch_var_mean", [&] {
    row_moments_kernel<scalar_t><<<static_cast<unsigned>(d.B * d.ch), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), d.N, row_mean.mutable_data_ptr<double>(),
        row_m2.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_moments_kernel<scalar_t><<<blocks_for(d.ch), kThreads, 0, stream>>>(
        row_mean.const_data_ptr<double>(), row_m2.const_data_ptr<double>(), d.B, d.ch, d.N,
        var.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {var, mean};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m) {
  m.impl("bn_relu", &cuda::bn_relu_cuda);
  m.impl("bn_relu_backward_reduce", &cuda::bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_apply", &cuda::bn_relu_backward_apply_cuda);
  m.impl("batch_var_mean", &cuda::batch_var_mean_cuda);
  m.impl("bn_relu_inplace", &cuda::bn_relu_inplace_cuda);
  m.impl("bn_relu_backward_apply_inplace", &cuda::bn_relu_backward_apply_inplace_cuda);
}

}  // namespace ocrkernels
