#!/usr/bin/env bash
# Build the op library, csrc/tools/gather_check and csrc/tools/pt2_run with CMake against the venv's LibTorch, then
# check (in fresh processes that do not import the Python package's _C) that the library loads
# and computes the reference's numbers, and that the C++ program prints the Python op's values
# (tests/test_cmake_program.py). The build directory is shared with that test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
build=${OCRKERNELS_CMAKE_BUILD_DIR:-$PWD/build/cmake-check}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$build" -j "${MAX_JOBS:-2}" >/dev/null
(cd "$build" && "$PY" - "$build/libocrkernels.so" <<'PYEOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
p = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 3
f = torch.randn(2, 4, 5, 7, dtype=torch.float64)
want = torch.einsum("bkn,bcn->bck", torch.softmax(p.flatten(2), -1), f.flatten(2)).unsqueeze(3)
got = torch.ops.ocrkernels.spatial_gather(p, f, 1.0)
err = (got - want).abs().max().item()
assert err < 1e-12, err
w, x = torch.randn(6, 4, dtype=torch.float64), torch.randn(2, 4, 37, dtype=torch.float64)
err2 = (torch.ops.ocrkernels.pixel_matmul(w, x) - w @ x).abs().max().item()
assert err2 < 1e-12, err2
print(f"CMake-built libocrkernels.so: spatial_gather and pixel_matmul match the reference "
      f"(max abs err {max(err, err2):.1e})")
PYEOF
)
"$build/gather_check"
OCRKERNELS_CMAKE_BUILD_DIR="$build" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cmake_program.py
