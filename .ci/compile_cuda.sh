#!/usr/bin/env bash
# Compile every .cu under csrc/ for sm_80 and sm_90 (compile only: no GPU needed), or the .cu
# files given as arguments (tests/test_cuda_build.py checks that a broken one fails here).
# CUDA 13 dropped sm_70 (V100), so A100 and H100 are the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mapfile -t torch_inc < <("$PY" -c 'import torch.utils.cpp_extension as c; print("\n".join("-I" + p for p in c.include_paths()))')
defs=()
# A CPU torch ships c10/cuda without the generated cuda_cmake_macros.h (Windows export macros
# only); setup.py and CMakeLists.txt skip it the same way.
if ! ls "${torch_inc[0]#-I}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  defs+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
if [ $# -gt 0 ]; then
  sources=("$@")
else
  mapfile -t sources < <(find csrc -name '*.cu' | sort)
fi
[ ${#sources[@]} -gt 0 ] || { echo "no .cu sources found" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
failed=0
for src in "${sources[@]}"; do
  echo "nvcc -c $src (sm_80, sm_90)"
  # In parallel (MAX_JOBS at a time): each file is independent.
  # -Xptxas -v: registers, stack and spills of every kernel, checked below (0 spills allowed)
  nvcc -c -std=c++20 -O3 --expt-relaxed-constexpr -Icsrc "${torch_inc[@]}" "${defs[@]}" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v \
    "$src" -o "$out/$(basename "$src").o" 2>"$out/$(basename "$src").log" \
    || { cat "$out/$(basename "$src").log" >&2; exit 1; } &
  pids+=($!)
  if [ ${#pids[@]} -ge "${MAX_JOBS:-2}" ]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [ "$failed" != 0 ]; then
  echo "CUDA compile check FAILED (see the nvcc errors above)" >&2
  exit 1
fi
kernels=$(cat "$out"/*.log | grep -c "Compiling entry function" || true)
spills=$(cat "$out"/*.log | grep "spill stores" | grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
if [ "$spills" != 0 ]; then
  echo "CUDA compile check FAILED: $spills of $kernels kernel compilations spill registers:" >&2
  cat "$out"/*.log | grep -B2 "spill stores" | grep -B2 -v " 0 bytes spill stores, 0 bytes spill loads" >&2
  exit 1
fi
echo "CUDA compile check: ${#sources[@]} source(s) compiled for sm_80 and sm_90," \
  "$kernels kernel compilations, none spills (ptxas -v)"
