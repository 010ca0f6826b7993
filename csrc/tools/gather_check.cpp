// A C++ user of the CMake-built op library: runs ocrkernels::spatial_gather (CPU kernel) on a
// fixed input through the dispatcher, as any LibTorch program would, and prints the result.
//
// The input is computed, not random, so that a test can rebuild it in Python and compare:
//   probs[0, k, h, w] = 0.25 * ((3k + 5h + 7w) mod 11) - 1,   B = 1, K = 3, H = 4, W = 5
//   feats[0, c, h, w] = 0.5 * ((2c + 3h + w) mod 7) - 1.5,    C = 2
// Output: one line "spatial_gather" and then the C * K values of R[0, c, k, 0], c-major,
// printed with 17 significant digits (float64, so they round-trip exactly).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  const double scale = argc > 1 ? std::stod(argv[1]) : 1.0;
  const int64_t K = 3, C = 2, H = 4, W = 5;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor probs = at::empty({1, K, H, W}, opts), feats = at::empty({1, C, H, W}, opts);
  auto p = probs.accessor<double, 4>();
  auto f = feats.accessor<double, 4>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t k = 0; k < K; ++k)
        p[0][k][h][w] = 0.25 * double((3 * k + 5 * h + 7 * w) % 11) - 1;
      for (int64_t c = 0; c < C; ++c)
        f[0][c][h][w] = 0.5 * double((2 * c + 3 * h + w) % 7) - 1.5;
    }
  // The library registers its ops when loaded (it is linked, so at program start).
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ocrkernels::spatial_gather", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  const at::Tensor out = op.call(probs, feats, scale);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({1, C, K, 1}), "unexpected output shape ",
              out.sizes());
  std::printf("spatial_gather\n");
  auto o = out.accessor<double, 4>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) std::printf("%.17g\n", o[0][c][k][0]);
  return 0;
}
