"""The CUDA side without a GPU: the compile check catches broken kernels, the common/ headers
compile as device code, and asking for the CUDA backend where it cannot run says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


# A device function that a kernel calls but nothing defines: without relocatable device code
# ptxas rejects it, so the compile check already fails on it.
MISSING_DEVICE_FUNCTION = r"""
__device__ float scale_of(int i);  // declared, never defined
__global__ void scaled(float* x) { x[threadIdx.x] *= scale_of(threadIdx.x); }
"""


@needs_nvcc
def test_compile_check_fails_on_an_undefined_device_function(tmp_path):
    src = tmp_path / "missing_device.cu"
    src.write_text(MISSING_DEVICE_FUNCTION)
    bad = run_compile_check(src)
    assert bad.returncode != 0
    assert "scale_of" in bad.stderr and "CUDA compile check FAILED" in bad.stderr


# The link check (.ci/link_cuda.sh --check) on tiny libraries linked as setup.py links
# ocrkernels._C_cuda with FORCE_CUDA=1 (g++ -shared, cudart, the CPU torch libraries): a
# library with one op and its CUDA kernel passes; the same with a host function that is
# declared and called but defined nowhere must fail, although nvcc and the linker both accept
# it (a shared library may leave symbols undefined: only the load on a GPU machine would fail).
LINK_CHECK = REPO / ".ci" / "link_cuda.sh"

ONE_OP_LIBRARY = r"""
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

__global__ void twice(float* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= 2.0f;
}

at::Tensor twice_cuda(const at::Tensor& x) {
  twice<<<1, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(x.mutable_data_ptr<float>(), x.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x;
}

TORCH_LIBRARY(ocrlinktest, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(ocrlinktest, CUDA, m) { m.impl("twice", &twice_cuda); }
"""

UNDEFINED_HOST_FUNCTION = r"""
void ocrlinktest_never_defined(float* x);  // declared, never defined
__global__ void clear(float* x) { x[threadIdx.x] = 0.0f; }
void clear_and_more(float* x) {
  clear<<<1, 32>>>(x);
  ocrlinktest_never_defined(x);
}
"""


def run_link_check(*args):
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(["bash", str(LINK_CHECK), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_cuda_libraries(tmp_path_factory):
    """(good, broken) shared libraries, sm_80 only, linked like setup.py's FORCE_CUDA=1 build."""
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("link")
    cuda_home = run_link_check("--print-cuda-home").stdout.strip()
    torch_inc = cpp_extension.include_paths()
    defs = [] if any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists()
                     for p in torch_inc) else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    objs = {}
    for name, text in (("one_op", ONE_OP_LIBRARY), ("undefined", UNDEFINED_HOST_FUNCTION)):
        (out / f"{name}.cu").write_text(text)
        cmd = ["nvcc", "-c", "-std=c++20", "-O3", "--expt-relaxed-constexpr",
               "-Xcompiler", "-fPIC", *(f"-I{p}" for p in torch_inc), *defs,
               "-gencode", "arch=compute_80,code=sm_80", str(out / f"{name}.cu"),
               "-o", str(out / f"{name}.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        objs[name] = out / f"{name}.o"
    lib_dirs = [f"-L{Path(cuda_home) / d}" for d in ("lib64", "lib")
                if (Path(cuda_home) / d).exists()]
    libs = {}
    for name, units in (("good", ["one_op"]), ("broken", ["one_op", "undefined"])):
        so = out / f"lib{name}.so"
        cmd = ["c++", "-shared", *(str(objs[u]) for u in units), *lib_dirs,
               f"-L{Path(torch.__file__).parent / 'lib'}", "-lcudart", "-lc10", "-ltorch",
               "-ltorch_cpu", "-o", str(so)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr  # the linker accepts the broken one too
        libs[name] = so
    return libs


@needs_nvcc
def test_link_check_passes_a_good_library(tiny_cuda_libraries):
    ok = run_link_check("--check", tiny_cuda_libraries["good"], "--namespace", "ocrlinktest",
                        "--arch", "8.0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "registers a CUDA kernel for all 1 ocrlinktest ops: twice" in ok.stdout
    assert "1 translation unit(s), each with sm_80 ELF" in ok.stdout
    assert "CUDA link check: libgood.so links" in ok.stdout


@needs_nvcc
def test_link_check_fails_on_an_undefined_host_function(tiny_cuda_libraries):
    bad = run_link_check("--check", tiny_cuda_libraries["broken"], "--namespace", "ocrlinktest",
                         "--arch", "8.0")
    assert bad.returncode != 0
    assert "ocrlinktest_never_defined(float*)" in bad.stderr
    assert "does not load" in bad.stderr and "CUDA link check FAILED" in bad.stderr


@needs_nvcc
def test_link_check_fails_on_missing_architectures(tiny_cuda_libraries):
    bad = run_link_check("--check", tiny_cuda_libraries["good"], "--namespace", "ocrlinktest",
                         "--arch", "8.0;9.0+PTX")
    assert bad.returncode != 0
    assert "embeds [sm_80 ELF], expected [sm_80 ELF, sm_90 ELF, compute_90 PTX]" in bad.stderr


@needs_nvcc
def test_link_check_fails_on_ops_without_a_cuda_kernel(tiny_cuda_libraries):
    """Against the ocrkernels schema (the in-place _C), the one-op library leaves every
    ocrkernels op without a CUDA kernel."""
    import importlib.util

    spec = importlib.util.find_spec("ocrkernels._C")
    if spec is None or not spec.origin:
        pytest.skip("ocrkernels._C is not built")
    bad = run_link_check("--check", tiny_cuda_libraries["good"], "--schema", spec.origin,
                         "--arch", "8.0")
    assert bad.returncode != 0
    assert "no CUDA kernel registered for: ocrkernels::" in bad.stderr
    assert "ocrkernels::spatial_gather" in bad.stderr


def test_every_cuda_source_registers_under_the_cuda_key():
    """Each .cu registers its ops with TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m), and together they
    cover every op schema of ops.cpp but the CPU-only ones that the link check lists (CPU_ONLY
    in .ci/link_cuda.sh: the pixel_matmul GEMMs, which run in cuBLAS on CUDA)."""
    import re

    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(',
                             (REPO / "csrc/ocrkernels/ops.cpp").read_text()))
    listed = re.search(r"^CPU_ONLY = \{(.*?)\}", (REPO / ".ci/link_cuda.sh").read_text(),
                       re.M | re.S)
    assert listed, "CPU_ONLY not found in .ci/link_cuda.sh"
    cpu_only = set(re.findall(r'"ocrkernels::(\w+)"', listed.group(1)))
    assert cpu_only == {"pixel_matmul", "pixel_matmul_into", "pixel_matmul_nt"}
    registered = set()
    for cu in sorted((REPO / "csrc/ocrkernels/cuda").glob("*.cu")):
        text = cu.read_text()
        assert "TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m)" in text, cu.name
        assert "torch/extension.h" not in text, f"{cu.name}: keep the headers lean"
        registered |= set(re.findall(r'm\.impl\("(\w+)"', text))
    assert len(schemas) == 14 and cpu_only <= schemas
    assert registered == schemas - cpu_only


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


# 64 accumulators live across a loop under a 32-register cap (2 blocks of 1024 threads per SM):
# ptxas has to spill them to local memory.
SPILLING_KERNEL = r"""
__global__ void __launch_bounds__(1024, 2) spills(const float* x, float* y, int n) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  for (int j = 0; j < n; ++j) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * x[j] + x[j + i];
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) y[threadIdx.x * 64 + i] = acc[i];
}
"""


@needs_nvcc
def test_compile_check_fails_on_a_register_spill(tmp_path):
    src = tmp_path / "spilling.cu"
    src.write_text(SPILLING_KERNEL)
    bad = run_compile_check(src)
    assert bad.returncode != 0
    assert "spill registers" in bad.stderr and "CUDA compile check FAILED" in bad.stderr
    assert "_Z6spillsPKfPfi" in bad.stderr  # names the kernel
