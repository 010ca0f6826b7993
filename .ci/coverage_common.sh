#!/usr/bin/env bash
# Line coverage of the shared host+device arithmetic (csrc/ocrkernels/common/*.h) by the CPU
# tests: the op library is built with CMake in Debug with gcov instrumentation, the Python
# package is pointed at it (OCRKERNELS_LIBRARY, instead of ocrkernels._C), the CPU kernel tests
# run, and tools/common_coverage.py sums the per-line counts of every header over all objects.
# Lines inside `#ifdef __CUDA_ARCH__` are device-only and not compiled on the host: not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
build=${OCRKERNELS_COVERAGE_BUILD_DIR:-$PWD/build/coverage}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DOCRKERNELS_COVERAGE=ON \
  -DOCRKERNELS_BUILD_TOOLS=OFF \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$build" -j "${MAX_JOBS:-2}" >/dev/null
find "$build" -name '*.gcda' -delete
OCRKERNELS_LIBRARY="$build/libocrkernels.so" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_spatial_gather.py \
  tests/test_object_attention.py tests/test_attention_train.py tests/test_nonfinite.py \
  -k "not compile and not gradcheck and not saved_activations and not training_step and not triton and not instruction_set and not cuda"
"$PY" tools/common_coverage.py "$build" "${@}"
