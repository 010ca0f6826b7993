// Allocation of the large outputs the CPU kernels write once, pixel by pixel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ocrkernels {
namespace cpu {

// at::empty, asking Linux to back the buffer with transparent huge pages where it may.
//
// Why: an output such as the gather's grad_feats (C x N floats, 33 MB at the ADE20K shape) is
// fresh memory on every call, and first-touching it 4 KiB at a time costs one page fault per
// page: about 8,000 faults, roughly a tenth of the backward's time on one core, and the faults of
// two threads contend on the process's memory map. With MADV_HUGEPAGE the same buffer takes one
// fault per 2 MiB. The advice only covers whole 2 MiB pages inside the buffer, changes no data
// and is ignored where THP is off; buffers below kMinBytes are left alone.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = int64_t(2) << 20;
  constexpr int64_t kMinBytes = int64_t(4) << 20;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes >= kMinBytes) {
    const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    const std::uintptr_t first = (begin + kHuge - 1) / kHuge * kHuge;
    const std::uintptr_t last = (begin + bytes) / kHuge * kHuge;
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace ocrkernels
