// 3x3 convolution (stride 1, padding 1, dilation 1, no groups) by Winograd's minimal filtering
// F(4x4, 3x3): each 4x4 block of outputs costs 36 products per (output, input) channel pair
// instead of 144. Eval-mode inference only: autograd (ocrkernels/winograd.py) differentiates the
// plain convolution of `weight`.
//
// With the 6x6 input tile d (rows 4 ty - 1 .. 4 ty + 4, columns likewise, zero outside the map),
// the 3x3 filter g and the usual matrices B^T (6x6), G (6x3) and A^T (4x6):
//   Y = A^T [ sum_c (G g G^T) .* (B^T d B) ] A
// G g G^T (the transformed weight, (36, O, C)) is computed once in float64 by
// ocrkernels.winograd.transform_weight and passed in. Three passes over the map:
//   1. input transform   V[s, c, t] = (B^T d_{c,t} B)[s]           (36, C, T), T = B * th * tw
//   2. 36 GEMMs           M[s]       = U[s] (O x C) . V[s] (C x T)  the micro-kernel of gemm_kernels.h
//   3. output transform  y          = relu?(A^T M_{o,t} A + bias[o]), cropped to H x W
// Every output element is computed by one fixed sequence of operations (no FMA contraction in
// the transforms, the GEMM sums over C in order), whichever thread runs it: the bits do not
// depend on the thread count. B^T and A^T hold small integers, so the transforms round only in
// their sums; the error of F(4x4, 3x3) against the direct convolution is measured in
// tests/test_winograd.py and docs/PERFORMANCE.md.
//
// Non-finite inputs: the transforms mix a tile's values with opposite signs, so one Inf would
// turn its whole neighbourhood into NaN where the direct convolution gives +-Inf. A map or a
// weight with any non-finite value therefore takes at::conv2d instead (a check the transforms
// make in passing).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

constexpr int64_t kTileN = 128;  // tiles per GEMM task

// B^T applied to a column (d0..d5).
template <typename T>
OCR_LOOP_BODY void bt6(T d0, T d1, T d2, T d3, T d4, T d5, T* v, int64_t step) {
  v[0 * step] = (T(4) * d0 - T(5) * d2) + d4;
  v[1 * step] = (-T(4) * (d1 + d2)) + (d3 + d4);
  v[2 * step] = (T(4) * (d1 - d2)) + (d4 - d3);
  v[3 * step] = (T(2) * (d3 - d1)) + (d4 - d2);
  v[4 * step] = (T(2) * (d1 - d3)) + (d4 - d2);
  v[5 * step] = (T(4) * d1 - T(5) * d3) + d5;
}

// A^T applied to a column (m0..m5).
template <typename T>
OCR_LOOP_BODY void at4(T m0, T m1, T m2, T m3, T m4, T m5, T* y, int64_t step) {
  const T p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
  y[0 * step] = (m0 + p12) + p34;
  y[1 * step] = d12 + T(2) * d34;
  y[2 * step] = p12 + T(4) * p34;
  y[3 * step] = (d12 + T(8) * d34) + m5;
}

// Pass 1 for tiles tx0 .. tx0 + tw - 1 of tile row ty of one channel map x (H x W): the six
// input rows 4 ty - 1 .. 4 ty + 4, columns 4 tx0 - 1 .. 4 (tx0 + tw) (zero outside the map).
// rows: 6 x (4 tw + 2) scratch, h: 36 x tw scratch. Writes V[s * CT + t0 + tx] for tx < tw.
// Returns whether every value read is finite.
template <typename T>
OCR_LOOP_BODY bool input_tile_row_body(const T* x, int64_t H, int64_t W, int64_t ty,
                                       int64_t tx0, int64_t tw, T* rows, T* h, T* V, int64_t CT,
                                       int64_t t0) {
  const int64_t wp = 4 * tw + 2, c0 = 4 * tx0 - 1;  // c0: map column of rows[r][0]
  const int64_t lo = std::max<int64_t>(0, -c0), hi = std::min<int64_t>(wp, W - c0);
  T finite = 0;
  for (int64_t r = 0; r < 6; ++r) {
    T* row = rows + r * wp;
    const int64_t y = 4 * ty - 1 + r;
    if (y < 0 || y >= H) {
      for (int64_t i = 0; i < wp; ++i) row[i] = 0;
      continue;
    }
    const T* src = x + y * W + c0;
    for (int64_t i = 0; i < lo; ++i) row[i] = 0;
#pragma omp simd reduction(+ : finite)
    for (int64_t i = lo; i < hi; ++i) {
      row[i] = src[i];
      finite += src[i] * T(0);  // NaN as soon as one value is NaN or +-Inf
    }
    for (int64_t i = std::max(hi, lo); i < wp; ++i) row[i] = 0;
  }
  // Horizontal: h[(r * 6 + k) * tw + tx] = (d_r B)[k] for every tile of the row.
  for (int64_t r = 0; r < 6; ++r) {
    const T* row = rows + r * wp;
    T* hr = h + r * 6 * tw;
    for (int64_t tx = 0; tx < tw; ++tx) {
      const T* d = row + 4 * tx;
      bt6(d[0], d[1], d[2], d[3], d[4], d[5], hr + tx, tw);
    }
  }
  // Vertical: V[(i * 6 + k)] = sum_r B^T[i, r] h[r, k], contiguous over tiles.
  for (int64_t k = 0; k < 6; ++k) {
    const T* h0 = h + (0 * 6 + k) * tw;
    const T* h1 = h + (1 * 6 + k) * tw;
    const T* h2 = h + (2 * 6 + k) * tw;
    const T* h3 = h + (3 * 6 + k) * tw;
    const T* h4 = h + (4 * 6 + k) * tw;
    const T* h5 = h + (5 * 6 + k) * tw;
    T* v = V + k * CT + t0;
#pragma omp simd
    for (int64_t tx = 0; tx < tw; ++tx)
      bt6(h0[tx], h1[tx], h2[tx], h3[tx], h4[tx], h5[tx], v + tx, 6 * CT);
  }
  return finite == 0;
}

// Pass 3 for one output channel: M[s * OT + t0 + tx] for tiles tx0 .. tx0 + tw - 1 of tile
// row ty into output rows 4 ty .. 4 ty + 3 of the channel's map y (cropped to H x W).
// g: 24 x tw scratch, line: 4 tw scratch.
template <typename T>
OCR_LOOP_BODY void output_tile_row_body(const T* M, int64_t OT, int64_t t0, int64_t tw,
                                        T bias, bool relu, T* g, T* line, T* y, int64_t H,
                                        int64_t W, int64_t ty, int64_t tx0) {
  // Vertical: g[(i * 6 + k) * tw + tx] = sum_r A^T[i, r] M[r * 6 + k].
  for (int64_t k = 0; k < 6; ++k) {
    const T* m0 = M + (0 * 6 + k) * OT + t0;
    const T* m1 = M + (1 * 6 + k) * OT + t0;
    const T* m2 = M + (2 * 6 + k) * OT + t0;
    const T* m3 = M + (3 * 6 + k) * OT + t0;
    const T* m4 = M + (4 * 6 + k) * OT + t0;
    const T* m5 = M + (5 * 6 + k) * OT + t0;
    T* gk = g + k * tw;
#pragma omp simd
    for (int64_t tx = 0; tx < tw; ++tx)
      at4(m0[tx], m1[tx], m2[tx], m3[tx], m4[tx], m5[tx], gk + tx, 6 * tw);
  }
  // Horizontal, one output row at a time.
  for (int64_t i = 0; i < 4; ++i) {
    const int64_t row = 4 * ty + i;
    if (row >= H) break;
    const T* gi = g + i * 6 * tw;
    for (int64_t tx = 0; tx < tw; ++tx)
      at4(gi[0 * tw + tx], gi[1 * tw + tx], gi[2 * tw + tx], gi[3 * tw + tx], gi[4 * tw + tx],
          gi[5 * tw + tx], line + 4 * tx, 1);
    T* dst = y + row * W + 4 * tx0;
    const int64_t n = std::min<int64_t>(4 * tw, W - 4 * tx0);
    for (int64_t c = 0; c < n; ++c) dst[c] = bias_relu(line[c], bias, relu);
  }
}

OCR_DISPATCH(bool, input_tile_row_f, input_tile_row_body<float>,
             (const float* x, int64_t H, int64_t W, int64_t ty, int64_t tx0, int64_t tw,
              float* rows, float* h, float* V, int64_t CT, int64_t t0),
             (x, H, W, ty, tx0, tw, rows, h, V, CT, t0))
OCR_DISPATCH(void, output_tile_row_f, output_tile_row_body<float>,
             (const float* M, int64_t OT, int64_t t0, int64_t tw, float bias, bool relu, float* g,
              float* line, float* y, int64_t H, int64_t W, int64_t ty, int64_t tx0),
             (M, OT, t0, tw, bias, relu, g, line, y, H, W, ty, tx0))

template <typename T>
bool input_tile_row(const T* x, int64_t H, int64_t W, int64_t ty, int64_t tx0, int64_t tw,
                    T* rows, T* h, T* V, int64_t CT, int64_t t0) {
  if constexpr (std::is_same_v<T, float>)
    return input_tile_row_f(x, H, W, ty, tx0, tw, rows, h, V, CT, t0);
  else
    return input_tile_row_body<T>(x, H, W, ty, tx0, tw, rows, h, V, CT, t0);
}

template <typename T>
void output_tile_row(const T* M, int64_t OT, int64_t t0, int64_t tw, T bias, bool relu, T* g,
                     T* line, T* y, int64_t H, int64_t W, int64_t ty, int64_t tx0) {
  if constexpr (std::is_same_v<T, float>)
    output_tile_row_f(M, OT, t0, tw, bias, relu, g, line, y, H, W, ty, tx0);
  else
    output_tile_row_body<T>(M, OT, t0, tw, bias, relu, g, line, y, H, W, ty, tx0);
}

// One task per block of up to kTileN tiles of one tile row of one image: the three passes run
// on the block with its transformed input V (36, C, nt) and products M (36, O, nt) in the
// thread's scratch, which stays in cache between passes; the transformed weight (36, O, C) is
// what streams. Returns false (`out` then partly written) when the input holds a non-finite
// value.
template <typename T>
bool winograd_impl(const at::Tensor& x, const at::Tensor& U, const T* bias, bool relu,
                   at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = U.size(1);
  const int64_t th = (H + 3) / 4, tw = (W + 3) / 4;
  const int64_t blocks_per_row = (tw + kTileN - 1) / kTileN;
  const int64_t nt_max = std::min(kTileN, tw);
  const T* xp = x.const_data_ptr<T>();
  const T* up = U.const_data_ptr<T>();
  T* yp = out.data_ptr<T>();

  struct Scratch {
    std::vector<T> V, M, rows, h, g, line;
  };
  std::atomic<bool> finite{true};
  cpu::parallel_tasks(
      B * th * blocks_per_row,
      [&] {
        return Scratch{std::vector<T>(36 * C * nt_max), std::vector<T>(36 * O * nt_max),
                       std::vector<T>(6 * (4 * nt_max + 2)), std::vector<T>(36 * nt_max),
                       std::vector<T>(24 * nt_max), std::vector<T>(4 * nt_max)};
      },
      [&](int64_t task, Scratch& s) {
        if (!finite.load(std::memory_order_relaxed)) return;
        const int64_t blk = task % blocks_per_row, ty = (task / blocks_per_row) % th;
        const int64_t b = task / (blocks_per_row * th);
        const int64_t tx0 = blk * kTileN, nt = std::min(kTileN, tw - tx0);
        T* V = s.V.data();
        T* M = s.M.data();
        bool ok = true;
        for (int64_t c = 0; c < C; ++c)
          ok &= input_tile_row<T>(xp + (b * C + c) * H * W, H, W, ty, tx0, nt, s.rows.data(),
                                  s.h.data(), V + c * nt, C * nt, 0);
        if (!ok) {
          finite.store(false, std::memory_order_relaxed);
          return;
        }
        for (int64_t k = 0; k < 36; ++k)
          cpu::gemm_nn<T>(O, C, nt, up + k * O * C, C, V + k * C * nt, nt, M + k * O * nt, nt);
        for (int64_t o = 0; o < O; ++o)
          output_tile_row<T>(M + o * nt, O * nt, 0, nt, bias ? bias[o] : T(0), relu, s.g.data(),
                             s.line.data(), yp + (b * O + o) * H * W, H, W, ty, tx0);
      });
  return finite.load();
}

// Whether every value of the float or double tensor `t` is finite: its exponent bits are not
// all ones. One read of the weight per call, in place; at::isfinite(t).all() made a bool copy
// and three more passes, a few milliseconds of every forward at the OCR head's shapes.
template <typename T, typename Bits>
bool all_finite_bits(const T* p, int64_t n, Bits exponent) {
  static_assert(sizeof(T) == sizeof(Bits));
  Bits hit = 0;  // an OR over all elements (vectorises, unlike a float reduction)
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, p + i, sizeof(Bits));
    hit |= static_cast<Bits>((bits & exponent) == exponent);
  }
  return hit == 0;
}

bool all_finite(const at::Tensor& t_in) {
  const at::Tensor t = t_in.contiguous();
  if (t.scalar_type() == at::kDouble)
    return all_finite_bits(t.const_data_ptr<double>(), t.numel(), uint64_t{0x7FF0000000000000});
  return all_finite_bits(t.const_data_ptr<float>(), t.numel(), uint32_t{0x7F800000});
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                const at::Tensor& weight_winograd,
                                const c10::optional<at::Tensor>& bias_in, bool relu) {
  check_conv3x3_winograd_args(x_in, weight, weight_winograd, bias_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor U = weight_winograd.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), O = weight.size(0);
  auto direct = [&] {
    at::Tensor y = at::conv2d(x, weight, bias_in, 1, 1, 1, 1);
    return relu ? at::relu(y) : y;
  };
  if (x.numel() == 0 || O == 0) return direct();
  if (!all_finite(weight) || (bias.defined() && !all_finite(bias))) return direct();
  at::Tensor out = cpu::empty_large({B, O, H, W}, x.options());
  bool ok;
  if (x.scalar_type() == at::kDouble)
    ok = winograd_impl<double>(x, U, bias.defined() ? bias.const_data_ptr<double>() : nullptr,
                               relu, out);
  else
    ok = winograd_impl<float>(x, U, bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                              relu, out);
  return ok ? out : direct();
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) { m.impl("conv3x3_winograd", &conv3x3_winograd_cpu); }

}  // namespace ocrkernels
