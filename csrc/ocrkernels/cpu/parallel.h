// Task-parallel loop for the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace ocrkernels {
namespace cpu {

// Runs body(task, scratch) for every task in [0, n) on torch's intra-op threads, handing the
// tasks out one at a time: on a shared machine a range split in fixed halves waits for its slower
// half. make_scratch() runs once per thread. Each task must write only its own outputs, so the
// result does not depend on which thread ran which task.
template <typename MakeScratch, typename Body>
void parallel_tasks(int64_t n, MakeScratch make_scratch, Body body) {
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
      auto scratch = make_scratch();
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n; ++task) body(task, scratch);
    }
    return;
  }
#endif
  auto scratch = make_scratch();
  for (int64_t task = 0; task < n; ++task) body(task, scratch);
}

}  // namespace cpu
}  // namespace ocrkernels
