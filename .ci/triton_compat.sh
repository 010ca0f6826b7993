#!/usr/bin/env bash
# The oldest Triton the project supports (3.6, what a typical CUDA machine image has today),
# beside the pinned one: installs it (and a NumPy its interpreter works with: Triton 3.6's
# interpreter converts size-1 arrays to scalars, which NumPy 2.3 and newer refuse) into a
# temporary directory that shadows the venv's copies on PYTHONPATH, then runs
#   - the op grid of tests/test_gpu_ops.py for the Triton backend under the interpreter
#     (every op x dtype x mode at tiny sizes, as make gpu-check's dry run), and
#   - the ahead-of-time compile check of every kernel, config and dtype for sm_80 and sm_90
#     (python -m ocrkernels.triton.aot, with its own Triton cache).
# Needs PyPI. Environment: PY (python with torch), TRITON_COMPAT_VERSION (default 3.6.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version=${TRITON_COMPAT_VERSION:-3.6.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$work/site" \
  "triton==$version" "numpy<2.3"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
got=$("$PY" -c 'import triton; print(triton.__version__)')
if [ "$got" != "$version" ]; then
  echo "Triton $version was asked for, $got imports" >&2
  exit 1
fi
echo "Triton $got: the op grid under the interpreter"
# -p no:warnings: Triton 3.6's interpreter warns on every size-1 conversion (NumPy 1.25+)
OCRKERNELS_GPU_TEST_DEVICE=cpu "$PY" -m pytest -q -m gpu -p no:cacheprovider -p no:warnings \
  tests/test_gpu_ops.py
echo "Triton $got: the ahead-of-time compile check"
TRITON_CACHE_DIR="$work/cache" "$PY" -m ocrkernels.triton.aot
