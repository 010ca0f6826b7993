"""The C++ kernels pick their instruction set at run time (AVX-512, AVX2+FMA, or the baseline
x86-64 one), capped by OCRKERNELS_CPU_ISA. The AVX-512 GEMM tiles must give the AVX2 path's
bits (each output element is the same chain of fused multiply-adds), and the baseline path the
same values to rounding. Each cap runs in its own process, since the choice is read once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ocrkernels
from conftest import REPO, rel_err

pytestmark = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                                reason="ocrkernels._C is not built")

# Outputs of every kind of GEMM call the kernels make: pixel_matmul (partial 6/12-row tiles,
# partial strips, a second product), pixel_matmul_nt (packed and dot-product paths),
# pixel_matmul_into, the gather forward and backward (K = 19 and 150, streamed gradients), the
# eval attention kernel (bias + ReLU epilogues, a streamed output), a training step and the
# Winograd convolution (its transforms and GEMMs).
SCRIPT = r"""
import sys, torch, ocrkernels
from ocrkernels.modules import ObjectAttention
torch.manual_seed(0)
ops = torch.ops.ocrkernels
res = {"isa": ocrkernels.ops.cpu_isa()}
res["mm"] = ops.pixel_matmul(torch.randn(37, 29), torch.randn(2, 29, 77),
                             torch.randn(37, 5), torch.randn(2, 5, 77))
res["mm_wide"] = ops.pixel_matmul(torch.randn(64, 48), torch.randn(1, 48, 200))
res["nt"] = ops.pixel_matmul_nt(torch.randn(2, 45, 333), torch.randn(2, 61, 333))
res["nt_narrow"] = ops.pixel_matmul_nt(torch.randn(1, 45, 333), torch.randn(1, 19, 333))
out = torch.empty(2, 13, 50)
ops.pixel_matmul_into(torch.randn(13, 7), torch.randn(2, 7, 50), None, None, out)
res["into"] = out
wino_w = torch.randn(24, 20, 3, 3)
res["winograd"] = ops.conv3x3_winograd(torch.randn(2, 20, 9, 263), wino_w,
                                       ocrkernels.winograd.transform_weight(wino_w),
                                       torch.randn(24), True)
for K, (H, W) in ((19, (13, 17)), (150, (32, 32))):
    p = torch.randn(2, K, H, W, requires_grad=True)
    f = torch.randn(2, 40, H, W, requires_grad=True)
    r = ocrkernels.spatial_gather(p, f, backend="cpu")
    gp, gf = torch.autograd.grad(r, (p, f), torch.randn_like(r))
    res[f"gather{K}"], res[f"gather{K}_dp"], res[f"gather{K}_df"] = r, gp, gf
for K, (H, W) in ((19, (9, 23)), (5, (16, 16))):
    block = ObjectAttention(64, 32).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        res[f"eval{K}"] = block(torch.randn(2, 64, H, W), torch.randn(2, 64, K, 1))
for recompute in (False, True):
    block = ObjectAttention(48, 16, recompute=recompute).train()
    x = torch.randn(2, 48, 7, 9, requires_grad=True)
    out = block(x, torch.randn(2, 48, 5, 1))
    out.backward(torch.randn_like(out))
    res[f"train{recompute}"] = out.detach()
    res[f"train{recompute}_dx"] = x.grad
    for name, prm in block.named_parameters():
        res[f"train{recompute}_{name}"] = prm.grad
torch.save(res, sys.argv[1])
"""


def run_with_cap(tmp_path, cap: str | None) -> dict:
    path = tmp_path / f"{cap or 'default'}.pt"
    env = {k: v for k, v in os.environ.items() if k != "OCRKERNELS_CPU_ISA"}
    if cap:
        env["OCRKERNELS_CPU_ISA"] = cap
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(path)


def test_every_instruction_set_gives_the_same_results(tmp_path):
    widest = run_with_cap(tmp_path, None)
    avx2 = run_with_cap(tmp_path, "avx2")
    baseline = run_with_cap(tmp_path, "baseline")
    assert widest["isa"] == ocrkernels.ops.cpu_isa()
    assert baseline["isa"] == "baseline"
    assert avx2["isa"] in ("avx2", "baseline")  # a CPU without AVX2 stays at the baseline
    names = [k for k in widest if k != "isa"]
    assert len(names) > 30
    for name in names:
        if avx2["isa"] == "avx2":  # the AVX-512 tiles reproduce the AVX2 bits
            assert torch.equal(widest[name], avx2[name]), name
        # no FMA on the baseline path: the same values to float32 rounding
        assert rel_err(baseline[name], widest[name]) < 1e-4, name


def test_a_bad_cap_is_refused_at_import():
    env = {**os.environ, "OCRKERNELS_CPU_ISA": "avx3"}
    proc = subprocess.run([sys.executable, "-c", "import ocrkernels"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "OCRKERNELS_CPU_ISA must be one of baseline, avx2, avx512" in proc.stderr
    assert "'avx3'" in proc.stderr
