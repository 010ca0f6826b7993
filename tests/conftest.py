"""Shared helpers for the test suite (CPU only; Triton kernels run under TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ocrnet.utils.memory import saved_tensor_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def run_models_bench(folder: Path, *args: str, timeout: float
                     ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``bench/models.py --quick --models hr18s --warmup 0 --threads 1 ARGS --json`` in
    ``folder``: (the finished process, asserted successful; its JSON rows). One thread: with
    two, a benchmark sharing the two cores makes OpenMP spin (4-5x slower)."""
    out = folder / "models.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "models.py"), "--quick", "--models", "hr18s",
         "--warmup", "0", "--threads", "1", *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (tiny models: a second OpenMP thread
    only adds barrier waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts: str) -> Path:
    """A file under ../shared. In CI it must exist; in a user's clone without it, skip."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI always has ../shared beside the clone")
        pytest.skip(f"{path} not found (the mmsegmentation fixtures live in ../shared)")
    return path


# -- spatial gather: inputs and one forward + backward, shared by every backend's tests --------

def make_inputs(B, K, C, H, W, dtype=torch.float32, logit_scale=3.0):
    """(probs (B, K, H, W), feats (B, C, H, W), grad_out (B, C, K, 1)), drawn in float64."""
    probs = (torch.randn(B, K, H, W, dtype=torch.float64) * logit_scale).to(dtype)
    feats = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, C, K, 1, dtype=torch.float64).to(dtype)
    return probs, feats, grad


def forward_backward(fn, probs, feats, grad, scale=1.0):
    """fn(probs, feats, scale) and its gradients with respect to both inputs."""
    p = probs.detach().requires_grad_(True)
    f = feats.detach().requires_grad_(True)
    out = fn(p, f, scale)
    gp, gf = torch.autograd.grad(out, (p, f), grad)
    return out, gp, gf


def saved_bytes(run, exclude=()):
    """Bytes autograd keeps for backward while run() runs (see
    :func:`ocrnet.utils.memory.saved_tensor_bytes`)."""
    return saved_tensor_bytes(run, exclude)[1]


def saved_bytes_beyond_inputs(fn, probs, feats):
    """Bytes autograd keeps for backward when fn(probs, feats) runs, beyond the inputs' own
    storages."""
    p, f = probs.requires_grad_(True), feats.requires_grad_(True)
    return saved_bytes(lambda: fn(p, f), exclude=(p, f))


def assert_compile_matches_eager(backend, probs, feats):
    """torch.compile(fullgraph=True) over a module that calls ocrkernels.spatial_gather with
    `backend` gives the eager module's output and input gradients, bit for bit."""
    import ocrkernels

    class GatherSum(torch.nn.Module):
        def forward(self, p, f):
            return ocrkernels.spatial_gather(p, f, 1.0, backend=backend).sum(dim=2)

    mod = GatherSum()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    p1, f1 = probs.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    p2, f2 = probs.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    out_c, out_e = compiled(p1, f1), mod(p2, f2)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    g = torch.randn_like(out_e)
    grads_c = torch.autograd.grad(out_c, (p1, f1), g)
    grads_e = torch.autograd.grad(out_e, (p2, f2), g)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def ref64(p, f, s):
    """The plain-PyTorch spatial gather in float64."""
    from ocrkernels import reference
    return reference.spatial_gather(p.double(), f.double(), s)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
