"""Backend choice happens in one place (ocrkernels.backends) and fails loudly."""

from __future__ import annotations

import pytest
import torch

import ocrkernels
from ocrkernels import backends
from ocrkernels._extension import extension_loaded

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="ocrkernels._C is not built")


@needs_ext
def test_auto_picks_cpu_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert ocrkernels.available_backends("cpu") == ["cpu", "reference"]
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cpu"


@needs_ext
def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    assert backends.resolve_backend("auto", torch.device("cpu")) == "reference"
    # an explicit backend wins over the environment
    assert backends.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    monkeypatch.setenv(backends.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=backends.BACKEND_ENV):
        backends.resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend():
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        ocrkernels.spatial_gather(p, f, backend="gpu")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    # without the interpreter, Triton runs only on CUDA tensors
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' is not available: .+"):
        ocrkernels.spatial_gather(p, f, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_request_without_a_gpu_is_clear_and_auto_falls_back():
    """CUDA tensors cannot exist here, but the backend choice for a CUDA device must still say
    why Triton cannot run (never crash), and auto must fall back to what can."""
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: "):
        backends.resolve_backend("triton", cuda)
    assert backends.available_backends(cuda)[-1] == "reference"
    assert "triton" not in backends.available_backends(cuda)
    assert backends.resolve_backend("auto", cuda) in ("cuda", "reference")


def test_triton_missing_gives_a_clear_error(monkeypatch):
    """A machine (with or without a GPU) where Triton is not installed: explicit requests say
    so, auto on CUDA falls back to the other backends."""
    import ocrkernels.triton as ot

    monkeypatch.setattr(ot, "triton_import_error", lambda: "ModuleNotFoundError: no triton")
    for device in ("cpu", "cuda"):
        reason = backends.unavailable_reason("triton", torch.device(device))
        assert "Triton could not be imported" in reason and "pip install triton" in reason
        assert "triton" not in backends.available_backends(device)
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="Triton could not be imported"):
        ocrkernels.spatial_gather(p, f, backend="triton")


def test_package_imports_and_runs_without_triton(tmp_path):
    """With `import triton` failing, the package imports, the other backends run and the
    Triton backend says why it cannot (a fresh interpreter with triton blocked)."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, ocrkernels\n"
        "p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)\n"
        "out = ocrkernels.spatial_gather(p, f, backend='reference')\n"
        "assert out.shape == (1, 4, 2, 1)\n"
        "try:\n"
        "    ocrkernels.spatial_gather(p, f, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
        "assert 'triton' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "ERR ocrkernels backend 'triton' is not available: Triton could not be imported" \
        in proc.stdout


@needs_ext
def test_backends_agree():
    p, f = torch.randn(2, 5, 9, 11) * 2, torch.randn(2, 7, 9, 11)
    torch.testing.assert_close(ocrkernels.spatial_gather(p, f, backend="cpu"),
                               ocrkernels.spatial_gather(p, f, backend="reference"),
                               rtol=1e-5, atol=1e-6)
