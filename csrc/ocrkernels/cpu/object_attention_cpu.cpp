// Eval-mode pixel-region attention on the CPU, one pass over pixel tiles.
//
// For each tile of kTile pixels of one image, with X the tile's features (C x nt):
//   Q1  = relu(Wq1 X + bq1)                (D x nt)
//   Q2  = relu(Wq2 Q1 + bq2)               (D x nt)
//   A   = softmax over K of (keys Q2)      (K x nt), keys already scaled by D^-0.5
//   Ctx = relu(values A)                   (C x nt), out_project folded onto the K values
//   Out = relu([Wx Wctx] [X; Ctx] + b)     (C x nt), the concat conv as one GEMM over 2C
// Every intermediate lives in per-thread tile buffers, written by the GEMM that produces it in
// the P16 panel layout the next GEMM reads (gemm_kernels.h), so nothing is packed twice: X is
// packed once, into the top rows of a panel whose bottom rows receive Ctx, and the last GEMM
// reads [X; Ctx] from it. Only Out is written to memory, past the caches. Tiles are
// independent and handed to threads one at a time, so the result does not depend on the thread
// count. BN-folded weights come from Python (ocrkernels/modules.py); bias and ReLU run in the
// GEMM epilogues.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/column_softmax.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

// Pixels per tile: wide enough that each block of weights fetched from L3 feeds four 16-pixel
// strips, narrow enough that the tile's buffers (about 400 KiB at C = 512) stay in L2.
constexpr int64_t kTile = 64;

// Softmax down each column of S (K x nt, row stride ld): the attention of every pixel. The
// body is common/column_softmax.h, the one the CUDA kernel runs per pixel. S in P16 is one
// call per strip (ld = 16).
OCR_DISPATCH(void, column_softmax_f32, ::ocrkernels::column_softmax<float>,
             (float* S, int64_t K, int64_t nt, int64_t ld, float* colmax, float* colsum),
             (S, K, nt, ld, colmax, colsum))

template <typename T>
void column_softmax_tile(T* S, int64_t K, int64_t nt, int64_t ld, T* colmax, T* colsum) {
  if constexpr (std::is_same_v<T, float>) column_softmax_f32(S, K, nt, ld, colmax, colsum);
  else column_softmax<T>(S, K, nt, ld, colmax, colsum);
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& feats, const at::Tensor& qw1_in,
                        const at::Tensor& qb1_in, const at::Tensor& qw2_in,
                        const at::Tensor& qb2_in, const at::Tensor& keys_in,
                        const at::Tensor& values_in, const at::Tensor& wctx_in,
                        const at::Tensor& wx_in, const at::Tensor& bout_in) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  auto prep = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3);
  const int64_t N = H * W, D = qw1_in.size(0), K = keys_in.size(1);
  at::Tensor X = prep(feats.reshape({B, C, N}));
  at::Tensor qw1 = prep(qw1_in), qb1 = prep(qb1_in), qw2 = prep(qw2_in), qb2 = prep(qb2_in);
  at::Tensor keys = prep(keys_in), values = prep(values_in);
  at::Tensor bout = prep(bout_in);
  at::Tensor wcat = at::cat({prep(wx_in), prep(wctx_in)}, 1).contiguous();  // (C, 2C)
  at::Tensor out = cpu::empty_large({B, C, N}, X.options());

  const T* x_ptr = X.const_data_ptr<T>();
  const T* qw1_p = qw1.const_data_ptr<T>();
  const T* qb1_p = qb1.const_data_ptr<T>();
  const T* qw2_p = qw2.const_data_ptr<T>();
  const T* qb2_p = qb2.const_data_ptr<T>();
  const T* keys_p = keys.const_data_ptr<T>();
  const T* values_p = values.const_data_ptr<T>();
  const T* wcat_p = wcat.const_data_ptr<T>();
  const T* bout_p = bout.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  const int64_t tiles = (N + kTile - 1) / kTile;

  // Panels (P16, kTile / 16 strips): q1, q2 (D rows), s (K rows), xctx (2C rows: X over Ctx).
  struct Scratch {
    std::vector<T> q1, q2, s, xctx, col;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<T>(D * kTile), std::vector<T>(D * kTile), std::vector<T>(K * kTile),
                   std::vector<T>(2 * C * kTile), std::vector<T>(2 * 16)};
  };
  cpu::parallel_tasks(B * tiles, make_scratch, [&](int64_t task, Scratch& w) {
    const int64_t b = task / tiles, n0 = (task % tiles) * kTile;
    const int64_t nt = std::min(kTile, N - n0);
    const T* xt = x_ptr + b * C * N + n0;  // (C, nt), row stride N
    T* ot = out_p + b * C * N + n0;
    T* xc = w.xctx.data();
    T* ctx = xc + C * 16;  // rows C .. 2C of every strip
    const int64_t xs = 2 * C * 16, qs = D * 16, ss = K * 16;  // strip steps
    cpu::pack_p16<T>(C, nt, xt, N, xc, xs);
    cpu::gemm_nn_p16<T>(D, C, nt, qw1_p, C, xc, xs, w.q1.data(), 16, qs, {qb1_p, true, false});
    cpu::gemm_nn_p16<T>(D, D, nt, qw2_p, D, w.q1.data(), qs, w.q2.data(), 16, qs,
                        {qb2_p, true, false});
    cpu::gemm_nn_p16<T>(K, D, nt, keys_p + b * K * D, D, w.q2.data(), qs, w.s.data(), 16, ss);
    for (int64_t s0 = 0; s0 < nt; s0 += 16)
      column_softmax_tile<T>(w.s.data() + (s0 / 16) * ss, K, std::min<int64_t>(16, nt - s0), 16,
                             w.col.data(), w.col.data() + 16);
    cpu::gemm_nn_p16<T>(C, K, nt, values_p + b * C * K, K, w.s.data(), ss, ctx, 16, xs,
                        {nullptr, true, false});
    cpu::gemm_nn_p16<T>(C, 2 * C, nt, wcat_p, 2 * C, xc, xs, ot, N, 16,
                        {bout_p, true, false, true});
  });
  return out.to(feats.scalar_type()).view({B, C, H, W});
}

at::Tensor object_attention_eval_cpu(const at::Tensor& feats, const at::Tensor& qw1,
                                     const at::Tensor& qb1, const at::Tensor& qw2,
                                     const at::Tensor& qb2, const at::Tensor& keys,
                                     const at::Tensor& values, const at::Tensor& wctx,
                                     const at::Tensor& wx, const at::Tensor& bout) {
  check_object_attention_eval_args(feats, qw1, qb1, qw2, qb2, keys, values, wctx, wx, bout);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (feats.scalar_type() == at::kDouble)
    return forward_impl<double>(feats, qw1, qb1, qw2, qb2, keys, values, wctx, wx, bout);
  return forward_impl<float>(feats, qw1, qb1, qw2, qb2, keys, values, wctx, wx, bout);
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("object_attention_eval", &object_attention_eval_cpu);
}

}  // namespace ocrkernels
