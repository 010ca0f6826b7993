// Spatial gather on the CPU: R[b, c, k] = sum_n softmax_n(s * P[b, k, n]) * F[b, c, n].
//
// Pixels are cut into chunks (the unit of parallel work) of a size set by N alone, so that the
// result's bits do not depend on the thread count or the batch, and chunks into tiles of kTileN
// pixels.
//
// Forward, per (batch, chunk): an online softmax over the chunk's tiles. For each tile every
// class row finds the tile max, merges it into the running statistics (max, sum of exp) and
// writes exp(s*P - max) to a K x kTileN scratch E; the chunk's weighted sums are rescaled where
// a max moved and E (K x nb) . F_tile^T (nb x C) is accumulated onto them by a register-blocked
// micro-kernel (gemm_nt) while E is still in cache. The chunks' partials are then
// merged in chunk order (no atomics). Only the per-row split log-sum-exp (B, K, 2) = (max,
// log sum) is kept for backward.
//
// Backward, per (batch, chunk), tile by tile: W is rebuilt from the saved (max, log sum),
//   D_tile      = dR^T (K x C) . F_tile      stored in grad_probs' buffer,
//   delta_part += rowsum(W * D_tile),
//   grad_F_tile = dR (C x K) . W (K x nb)    written straight into grad_feats;
// then, per row, delta = sum of the chunks' parts in chunk order and a last pass turns D into
// grad_P = s * W * (D - delta), rebuilding W once more (an exp is cheaper than a K x N map).
//
// fp16 / bf16 inputs are accumulated in fp32; fp64 stays fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/online_softmax.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

// The exp loops are the only element-wise work of any weight; each is compiled for AVX2+FMA
// and for the baseline ISA (OCR_DISPATCH, gemm_kernels.h).

// max_i s * x[i]
template <typename T>
OCR_LOOP_BODY T scaled_max_body(const T* x, T s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    T v = s * x[i];
    m = v > m ? v : m;
  }
  return m;
}

// out[i] = exp(s * x[i] - shift); returns sum_i out[i].
template <typename T>
OCR_LOOP_BODY T exp_shifted_body(const T* x, T s, T shift, T* out, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    T v = s * x[i];  // rounded before the shift, as softmax(s * x) does
    T e = exp_acc(v - shift);
    out[i] = e;
    sum += e;
  }
  return sum;
}

// d[i] <- s * w[i] * (d[i] - delta) with w[i] = softmax_weight(s * x[i], m, logl).
template <typename T>
OCR_LOOP_BODY void softmax_grad_body(const T* x, T s, T m, T logl, T delta, T* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T w = softmax_weight(s * x[i], m, logl);
    d[i] = s * softmax_input_grad(w, d[i], delta);
  }
}

// sum_i w[i] * d[i] with w[i] = softmax_weight(s * x[i], m, logl); w is written to `w_out` as
// one row of a P16 operand (runs of 16 values `strip_stride` apart), zero past n. The sum is
// kept in 16 lanes across the runs.
template <typename T>
OCR_LOOP_BODY T weights_dot_body(const T* x, T s, T m, T logl, const T* d, T* w_out,
                                 int64_t strip_stride, int64_t n) {
  T acc[16] = {};
  int64_t i0 = 0;
  for (; i0 + 16 <= n; i0 += 16) {
    T* w_strip = w_out + (i0 / 16) * strip_stride;
#pragma omp simd
    for (int64_t q = 0; q < 16; ++q) {
      const T w = softmax_weight(s * x[i0 + q], m, logl);
      w_strip[q] = w;
      acc[q] += w * d[i0 + q];
    }
  }
  if (i0 < n) {
    T* w_strip = w_out + (i0 / 16) * strip_stride;
    for (int64_t q = 0; q < 16; ++q) {
      const T w = i0 + q < n ? softmax_weight(s * x[i0 + q], m, logl) : T(0);
      w_strip[q] = w;
      if (i0 + q < n) acc[q] += w * d[i0 + q];
    }
  }
  T sum = 0;
  for (int64_t q = 0; q < 16; ++q) sum += acc[q];
  return sum;
}

OCR_DISPATCH(float, scaled_max_f32, scaled_max_body<float>,
             (const float* x, float s, int64_t n), (x, s, n))
OCR_DISPATCH(float, exp_shifted_f32, exp_shifted_body<float>,
             (const float* x, float s, float shift, float* out, int64_t n),
             (x, s, shift, out, n))
OCR_DISPATCH(void, softmax_grad_f32, softmax_grad_body<float>,
             (const float* x, float s, float m, float logl, float delta, float* d, int64_t n),
             (x, s, m, logl, delta, d, n))
OCR_DISPATCH(float, weights_dot_f32, weights_dot_body<float>,
             (const float* x, float s, float m, float logl, const float* d, float* w_out,
              int64_t strip_stride, int64_t n),
             (x, s, m, logl, d, w_out, strip_stride, n))

// fp32 goes through the AVX2 / baseline dispatch; fp64 runs the bodies as they are.
template <typename T>
T scaled_max(const T* x, T s, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return scaled_max_f32(x, s, n);
  else return scaled_max_body(x, s, n);
}
template <typename T>
T exp_shifted(const T* x, T s, T shift, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return exp_shifted_f32(x, s, shift, out, n);
  else return exp_shifted_body(x, s, shift, out, n);
}
template <typename T>
void softmax_grad(const T* x, T s, T m, T logl, T delta, T* d, int64_t n) {
  if constexpr (std::is_same_v<T, float>) softmax_grad_f32(x, s, m, logl, delta, d, n);
  else softmax_grad_body(x, s, m, logl, delta, d, n);
}
template <typename T>
T weights_dot(const T* x, T s, T m, T logl, const T* d, T* w_out, int64_t strip_stride,
              int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    return weights_dot_f32(x, s, m, logl, d, w_out, strip_stride, n);
  else return weights_dot_body(x, s, m, logl, d, w_out, strip_stride, n);
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Chunks of pixels are the unit of parallel work; tiles are the unit of the fused loop.
constexpr int64_t kTileN = 512;

// kMaxChunkN pixels per chunk, or fewer for a small image so that it still makes kMinChunks
// tasks (a multiple of 64, at least kMinChunkN): one image of 32 x 32 pixels is 4 tasks, not 1.
constexpr int64_t kMaxChunkN = 2048, kMinChunkN = 256, kMinChunks = 8;

int64_t chunk_size(int64_t n) {
  const int64_t even = ((n + kMinChunks - 1) / kMinChunks + 63) / 64 * 64;
  return std::min(kMaxChunkN, std::max(kMinChunkN, even));
}
int64_t num_chunks(int64_t n) { return (n + chunk_size(n) - 1) / chunk_size(n); }

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& probs, const at::Tensor& feats,
                                                double scale_d) {
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  const int64_t N = probs.size(2) * probs.size(3);
  const int64_t chunk = chunk_size(N), T = num_chunks(N);
  const auto acc = acc_type_of(probs.scalar_type());
  const acc_t s = static_cast<acc_t>(scale_d);

  at::Tensor P = probs.reshape({B, K, N}).contiguous().to(acc);
  at::Tensor F = feats.reshape({B, C, N}).contiguous().to(acc);
  auto opts = P.options();
  // Per-chunk partials: softmax statistics and the weighted feature sums against the chunk max.
  // With many classes the sums are class-major (K x C): E's rows are then the GEMM's A operand
  // as written and its 16-wide strips run over channels, with no padding of the classes. With
  // a few classes they are channel-major (C x K), the shape gemm_nt handles without packing.
  // Every chunk's first tile overwrites its block, so no zero fill.
  const bool class_major = K >= cpu::kNtPackMinCols;
  const int64_t sk = class_major ? C : 1, sc = class_major ? 1 : K;  // strides of (k, c)
  at::Tensor partial = at::empty({B, T, K * C}, opts);
  std::vector<SoftmaxStats<acc_t>> stats(B * T * K);
  const acc_t* p_ptr = P.const_data_ptr<acc_t>();
  const acc_t* f_ptr = F.const_data_ptr<acc_t>();
  acc_t* part_ptr = partial.data_ptr<acc_t>();

  struct Scratch {
    std::vector<acc_t> E, alpha;  // tile weights (K x kTileN), per-class rescales
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<acc_t>(K * kTileN), std::vector<acc_t>(K)};
  };
  cpu::parallel_tasks(B * T, make_scratch, [&](int64_t task, Scratch& scratch) {
    acc_t* E = scratch.E.data();
    acc_t* alpha = scratch.alpha.data();
    const int64_t b = task / T, j = task % T;
    const int64_t c0 = j * chunk, c1 = std::min(N, c0 + chunk);
    SoftmaxStats<acc_t>* st = stats.data() + task * K;
    acc_t* O = part_ptr + task * K * C;
    for (int64_t k = 0; k < K; ++k) st[k] = empty_stats<acc_t>();
    for (int64_t n0 = c0; n0 < c1; n0 += kTileN) {
      const int64_t nb = std::min(kTileN, c1 - n0);
      const bool first = n0 == c0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* x = p_ptr + (b * K + k) * N + n0;
        const acc_t m = std::max(st[k].max, scaled_max(x, s, nb));
        const acc_t tile_sum = exp_shifted(x, s, exp_shift(m), E + k * kTileN, nb);
        alpha[k] = rescale(st[k].max, m);
        st[k] = merge(st[k], SoftmaxStats<acc_t>{m, tile_sum});
      }
      if (!first)
        for (int64_t k = 0; k < K; ++k)
          if (alpha[k] != acc_t(1))
            for (int64_t c = 0; c < C; ++c) O[k * sk + c * sc] *= alpha[k];
      const acc_t* Ft = f_ptr + b * C * N + n0;
      if (class_major)  // O (K x C) (+)= E (K x nb) . F_tile^T (nb x C)
        cpu::gemm_nt<acc_t>(K, C, nb, E, kTileN, Ft, N, O, C, !first);
      else  // O (C x K) (+)= F_tile (C x nb) . E^T (nb x K)
        cpu::gemm_nt<acc_t>(C, K, nb, Ft, N, E, kTileN, O, K, !first);
    }
  });

  // Merge the chunks of each row in chunk order: R = sum_j exp(m_j - m) O_j / L.
  at::Tensor lse = at::empty({B, K, 2}, opts);  // (max, log sum) per row
  at::Tensor factor = at::empty({B, T, K}, opts);
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  acc_t* factor_ptr = factor.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      SoftmaxStats<acc_t> total = stats[(b * T) * K + k];
      for (int64_t j = 1; j < T; ++j) total = merge(total, stats[(b * T + j) * K + k]);
      lse_ptr[(b * K + k) * 2] = total.max;
      lse_ptr[(b * K + k) * 2 + 1] = log_sum(total);
      for (int64_t j = 0; j < T; ++j)
        factor_ptr[(b * T + j) * K + k] =
            rescale(stats[(b * T + j) * K + k].max, total.max) / total.sum;
    }
  }
  at::Tensor out_acc = at::empty({B, C, K}, opts);
  acc_t* o_ptr = out_acc.data_ptr<acc_t>();
  at::parallel_for(0, B * K, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      acc_t* o = o_ptr + b * C * K + k;  // column k of (C, K)
      for (int64_t c = 0; c < C; ++c) o[c * K] = 0;
      for (int64_t j = 0; j < T; ++j) {
        const acc_t* pj = part_ptr + (b * T + j) * K * C + k * sk;
        const acc_t fj = factor_ptr[(b * T + j) * K + k];
        for (int64_t c = 0; c < C; ++c) o[c * K] += pj[c * sc] * fj;
      }
    }
  });
  at::Tensor out = out_acc.to(probs.scalar_type()).unsqueeze(3);
  return {out, lse};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out,
                                                 const at::Tensor& probs, const at::Tensor& feats,
                                                 const at::Tensor& lse_in, double scale_d) {
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  const int64_t H = probs.size(2), W = probs.size(3), N = H * W;
  const int64_t chunk = chunk_size(N), T = num_chunks(N);
  const auto acc = acc_type_of(probs.scalar_type());
  const acc_t s = static_cast<acc_t>(scale_d);

  at::Tensor P = probs.reshape({B, K, N}).contiguous().to(acc);
  at::Tensor F = feats.reshape({B, C, N}).contiguous().to(acc);
  at::Tensor dR = grad_out.reshape({B, C, K}).to(acc).contiguous();
  at::Tensor dRt = dR.transpose(1, 2).contiguous();  // (B, K, C)
  at::Tensor lse = lse_in.to(acc).contiguous();
  auto opts = P.options();
  // D = dR^T F is built in grad_probs' buffer and turned into grad_probs in place at the end;
  // fp16 / bf16 results go through fp32 buffers.
  at::Tensor gP = cpu::empty_large({B, K, N}, opts);
  at::Tensor gF = cpu::empty_large({B, C, N}, opts);
  at::Tensor delta_part = at::zeros({B, T, K}, opts);
  const acc_t* p_ptr = P.const_data_ptr<acc_t>();
  const acc_t* f_ptr = F.const_data_ptr<acc_t>();
  const acc_t* dr_ptr = dR.const_data_ptr<acc_t>();
  const acc_t* drt_ptr = dRt.const_data_ptr<acc_t>();
  const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
  acc_t* gp_ptr = gP.data_ptr<acc_t>();
  acc_t* gf_ptr = gF.data_ptr<acc_t>();
  acc_t* dp_ptr = delta_part.data_ptr<acc_t>();

  // W of one tile, in P16 (strips of 16 pixels): the B operand of the grad_F product.
  auto make_scratch = [&] { return std::vector<acc_t>(cpu::p16_floats(K, kTileN)); };
  cpu::parallel_tasks(B * T, make_scratch, [&](int64_t task, std::vector<acc_t>& scratch) {
    acc_t* Wt = scratch.data();
    const int64_t b = task / T, j = task % T;
    const int64_t c0 = j * chunk, c1 = std::min(N, c0 + chunk);
    for (int64_t n0 = c0; n0 < c1; n0 += kTileN) {
      const int64_t nb = std::min(kTileN, c1 - n0);
      const acc_t* Ft = f_ptr + b * C * N + n0;
      acc_t* D = gp_ptr + b * K * N + n0;
      // D (K x nb) = dR^T (K x C) . F_tile (C x nb)
      cpu::gemm_nn<acc_t>(K, C, nb, drt_ptr + b * K * C, C, Ft, N, D, N);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = b * K + k;
        if (k + 2 < K)
          for (int64_t i = 0; i < nb; i += 16)
            __builtin_prefetch(p_ptr + (row + 2) * N + n0 + i, 0, 3);
        dp_ptr[task * K + k] +=
            weights_dot(p_ptr + row * N + n0, s, lse_ptr[2 * row], lse_ptr[2 * row + 1],
                        D + k * N, Wt + k * 16, 16 * K, nb);
      }
      // grad_F_tile (C x nb) = dR (C x K) . W (K x nb)
      // (streamed past the caches: grad_feats is written once and is C / K times D's size)
      cpu::gemm_nn_p16<acc_t>(C, K, nb, dr_ptr + b * C * K, K, Wt, 16 * K,
                              gf_ptr + b * C * N + n0, N, 16, {nullptr, false, false, true});
    }
  });

  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / K, k = row % K;
      acc_t delta = 0;
      for (int64_t j = 0; j < T; ++j) delta += dp_ptr[(b * T + j) * K + k];
      softmax_grad(p_ptr + row * N, s, lse_ptr[2 * row], lse_ptr[2 * row + 1], delta,
                   gp_ptr + row * N, N);
    }
  });

  return {gP.to(probs.scalar_type()).view({B, K, H, W}),
          gF.to(probs.scalar_type()).view({B, C, H, W})};
}

std::tuple<at::Tensor, at::Tensor> spatial_gather_forward_cpu(const at::Tensor& probs,
                                                              const at::Tensor& feats,
                                                              double scale) {
  check_spatial_gather_args(probs, feats);
  // The ATen calls inside work on raw blocks: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView guard;
  if (probs.scalar_type() == at::kDouble) return forward_impl<double>(probs, feats, scale);
  return forward_impl<float>(probs, feats, scale);
}

std::tuple<at::Tensor, at::Tensor> spatial_gather_backward_cpu(const at::Tensor& grad_out,
                                                               const at::Tensor& probs,
                                                               const at::Tensor& feats,
                                                               const at::Tensor& lse,
                                                               double scale) {
  check_spatial_gather_backward_args(grad_out, probs, feats, lse);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (probs.scalar_type() == at::kDouble)
    return backward_impl<double>(grad_out, probs, feats, lse, scale);
  return backward_impl<float>(grad_out, probs, feats, lse, scale);
}

at::Tensor spatial_gather_cpu(const at::Tensor& probs, const at::Tensor& feats, double scale) {
  return std::get<0>(spatial_gather_forward_cpu(probs, feats, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("spatial_gather", &spatial_gather_cpu);
  m.impl("spatial_gather_forward", &spatial_gather_forward_cpu);
  m.impl("spatial_gather_backward", &spatial_gather_backward_cpu);
}

}  // namespace ocrkernels
