// conv3x3_winograd on CUDA (schema in ops.cpp; the Winograd kernel itself is the CPU's,
// cpu/winograd_conv_cpu.cpp). On a GPU the op is cuDNN's convolution of `weight`: cuDNN picks
// its own algorithm for 3x3 convolutions (Winograd among them) and runs it on tensor cores, so
// the transformed weight is not read. Registered so that every op of the library has a CUDA
// kernel; ocrkernels.backends does not route CUDA maps here (WinogradConv2d calls F.conv2d).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace ocrkernels {
namespace cuda {
namespace {

at::Tensor conv3x3_winograd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& weight_winograd,
                                 const c10::optional<at::Tensor>& bias, bool relu) {
  check_conv3x3_winograd_args(x, weight, weight_winograd, bias);
  at::Tensor y = at::conv2d(x, weight, bias, 1, 1, 1, 1);
  return relu ? at::relu_(y) : y;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m) {
  m.impl("conv3x3_winograd", &cuda::conv3x3_winograd_cuda);
}

}  // namespace ocrkernels
