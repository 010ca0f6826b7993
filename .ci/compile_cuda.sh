#!/usr/bin/env bash
# Compile every .cu under csrc/ for sm_80 and sm_90 (compile only: no GPU needed).
# CUDA 13 dropped sm_70 (V100), so A100 and H100 are the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
torch_inc=$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
mapfile -t sources < <(find csrc -name '*.cu' | sort)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in "${sources[@]}"; do
  echo "nvcc -c $src (sm_80, sm_90)"
  nvcc -c -std=c++20 -O3 --expt-relaxed-constexpr -Icsrc $torch_inc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$src" -o "$out/$(basename "$src").o"
done
echo "CUDA compile check: ${#sources[@]} source(s) compiled for sm_80 and sm_90"
