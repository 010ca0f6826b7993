"""The CUDA side without a GPU: the compile check catches broken kernels, the common/ headers
compile as device code, and asking for the CUDA backend where it cannot run says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import ocrkernels
from conftest import REPO
from ocrkernels import ops

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")

# A kernel that runs the shared arithmetic in device code (what the CUDA kernels call).
GOOD_KERNEL = r"""
#include "ocrkernels/common/bn_relu.h"
#include "ocrkernels/common/bn_stats.h"
#include "ocrkernels/common/column_softmax.h"
#include "ocrkernels/common/online_softmax.h"

__global__ void shared_math(float* x, double* y) {
  using namespace ocrkernels;
  SoftmaxStats<float> s = merge(empty_stats<float>(), SoftmaxStats<float>{x[0], 1.0f});
  x[1] = softmax_weight(x[2], s.max, log_sum(s)) + bn_relu_apply(x[3], x[4], x[5], x[6]);
  float cmax, csum;
  column_softmax<float>(x + 8, 4, 1, 1, &cmax, &csum);
  y[0] = biased_variance(merge_moments(moments_from_shifted_sums(y[1], y[2], y[3], 4.0),
                                       Moments{2.0, y[4], y[5]}));
}
"""

# The same kernel with one mistake (merge takes two states): the check must fail on it.
BROKEN_KERNEL = GOOD_KERNEL.replace("merge(empty_stats<float>(), SoftmaxStats<float>{x[0], 1.0f})",
                                    "merge(empty_stats<float>())")


def run_compile_check(*sources):
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(["bash", str(REPO / ".ci" / "compile_cuda.sh"), *map(str, sources)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_nvcc
def test_compile_check_passes_a_good_kernel_and_fails_a_broken_one(tmp_path):
    assert BROKEN_KERNEL != GOOD_KERNEL
    good, broken = tmp_path / "good.cu", tmp_path / "broken.cu"
    good.write_text(GOOD_KERNEL)
    broken.write_text(BROKEN_KERNEL)
    ok = run_compile_check(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 source(s) compiled for sm_80 and sm_90" in ok.stdout
    bad = run_compile_check(good, broken)
    assert bad.returncode != 0
    assert "broken.cu" in bad.stderr and "error" in bad.stderr
    assert "CUDA compile check FAILED" in bad.stderr


def test_every_cuda_source_registers_under_the_cuda_key():
    """Each .cu registers its ops with TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m), and together they
    cover every op schema of ops.cpp (so a CUDA torch has no op without a CUDA kernel)."""
    import re

    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(',
                             (REPO / "csrc/ocrkernels/ops.cpp").read_text()))
    registered = set()
    for cu in sorted((REPO / "csrc/ocrkernels/cuda").glob("*.cu")):
        text = cu.read_text()
        assert "TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m)" in text, cu.name
        assert "torch/extension.h" not in text, f"{cu.name}: keep the headers lean"
        registered |= set(re.findall(r'm\.impl\("(\w+)"', text))
    assert len(schemas) == 9 and registered == schemas


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*runs on cuda "
                                           "tensors, got tensors on cpu"):
        ocrkernels.spatial_gather(p, f, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_backend_without_a_cuda_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: ") as info:
        ops.resolve_backend("cuda", torch.device("cuda"))
    msg = str(info.value)
    if torch.version.cuda is None:
        # a CPU torch: the CUDA kernels are not loaded, built or not, and the message says so
        assert "no CUDA kernels are registered" in msg
        assert ("no ocrkernels._C_cuda" in msg) or ("has no CUDA support" in msg)
    else:  # pragma: no cover - a CUDA torch on a machine without a GPU
        assert "no CUDA device" in msg or "no CUDA kernels" in msg
    assert "cuda" not in ops.available_backends("cuda")


def test_cuda_library_is_not_loaded_into_a_cpu_torch():
    """A FORCE_CUDA=1 build on a CPU torch produces ocrkernels._C_cuda, which must stay unloaded
    (its c10_cuda symbols do not exist here) while the CPU kernels keep working."""
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA: the CUDA kernels load there")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("ocrkernels::spatial_gather",
                                                              "CUDA")
    if ops.extension_loaded():
        p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
        torch.testing.assert_close(ocrkernels.spatial_gather(p, f, backend="cpu"),
                                   ocrkernels.spatial_gather(p, f, backend="reference"))
