"""The LibTorch (CMake) build: csrc/tools/gather_check, a C++ program linked against the
CMake-built op library, runs the CPU spatial_gather on a fixed input and prints R; the values
must equal the Python op's. The program runs in its own process: the CMake library and
ocrkernels._C both define the ocrkernels op schemas, which one process cannot hold twice.

The build directory is kept (OCRKERNELS_CMAKE_BUILD_DIR, default build/cmake-check), so reruns
and .ci/cmake_check.sh only rebuild what changed."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import ocrkernels
from conftest import REPO
from ocrkernels import ops, reference

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None,
                       reason="cmake is not installed: the LibTorch build cannot be checked"),
    pytest.mark.skipif(not ops.extension_loaded(), reason="ocrkernels._C is not built"),
]

BUILD_DIR = os.environ.get("OCRKERNELS_CMAKE_BUILD_DIR", str(REPO / "build" / "cmake-check"))


def fixed_inputs():
    """The input gather_check.cpp builds, from the same formulas."""
    K, C, H, W = 3, 2, 4, 5
    k, h, w = torch.meshgrid(torch.arange(K), torch.arange(H), torch.arange(W), indexing="ij")
    probs = (0.25 * ((3 * k + 5 * h + 7 * w) % 11) - 1).double().unsqueeze(0)
    c, h, w = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    feats = (0.5 * ((2 * c + 3 * h + w) % 7) - 1.5).double().unsqueeze(0)
    return probs, feats


def build_program(target: str) -> str:
    """Configure the CMake build against this LibTorch, build ``target``, return its path."""
    prefix = torch.utils.cmake_prefix_path
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd in (["cmake", "-S", str(REPO), "-B", BUILD_DIR, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", BUILD_DIR, "-j", jobs, "--target", target]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}" \
                                     f"\n{proc.stderr[-4000:]}"
    exe = os.path.join(BUILD_DIR, target)
    assert os.path.exists(exe)
    return exe


@pytest.fixture(scope="module")
def gather_check():
    return build_program("gather_check")


def run_program(exe, scale):
    proc = subprocess.run([exe, repr(scale)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "spatial_gather"
    return torch.tensor([float(v) for v in lines[1:]], dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cpp_program_prints_the_python_ops_result(gather_check, scale):
    got = run_program(gather_check, scale)
    probs, feats = fixed_inputs()
    python_op = ocrkernels.spatial_gather(probs, feats, scale, backend="cpu").flatten()
    want = reference.spatial_gather(probs, feats, scale).flatten()
    assert got.shape == (6,)
    # the same kernel, compiled twice with the same flags; printed with 17 digits
    torch.testing.assert_close(got, python_op, rtol=0, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # and not a constant: the rows differ and the scale matters
    assert got.unique().numel() == 6


def test_hand_checked_value(gather_check):
    """R[0, 0, 0] for scale 1 from the formulas directly (20 pixels, plain Python)."""
    import math

    logits = [0.25 * ((5 * h + 7 * w) % 11) - 1 for h in range(4) for w in range(5)]
    feats = [0.5 * ((3 * h + w) % 7) - 1.5 for h in range(4) for w in range(5)]
    z = sum(math.exp(v) for v in logits)
    r000 = sum(math.exp(v) / z * f for v, f in zip(logits, feats))
    assert run_program(gather_check, 1.0)[0].item() == pytest.approx(r000, rel=1e-13)


@pytest.fixture(scope="module")
def pt2_run():
    return build_program("pt2_run")


def test_cpp_program_runs_the_exported_pt2_package(pt2_run, tmp_path):
    """`ocrnet export --format pt2` of a small OCRNet (dynamic shapes), run from C++ with the
    CMake library serving the fused ops: the Python package's logits, bit for bit, at a size
    other than the example's."""
    import numpy as np

    from ocrnet.cli import main as cli_main

    package = tmp_path / "tiny.pt2"
    assert cli_main(["export", "ocrnet_hrtiny8_1xb4-20_synthetic-32x64", "--format", "pt2",
                     "--dynamic", "--shape", "64", "64", "--out", str(package)]) == 0
    img = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    img.numpy().tofile(tmp_path / "img.bin")
    proc = subprocess.run([pt2_run, str(package), str(tmp_path / "img.bin"), "1", "3", "96",
                           "160", str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shape = tuple(int(v) for v in proc.stdout.split()[1:])
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32)).view(shape)
    with torch.no_grad():
        want = torch._inductor.aoti_load_package(str(package))(img)
    assert got.shape == want.shape == (1, 7, 96, 160)
    assert torch.equal(got, want)
    assert got.abs().max() > 0


def test_cpp_pt2_program_refuses_a_short_image(pt2_run, tmp_path):
    (tmp_path / "img.bin").write_bytes(b"\0" * 12)
    proc = subprocess.run([pt2_run, "missing.pt2", str(tmp_path / "img.bin"), "1", "3", "2",
                           "2", str(tmp_path / "out.bin")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "does not hold exactly 12 float32 values" in proc.stderr
