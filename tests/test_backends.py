"""Backend choice happens in one place (ocrkernels.ops) and fails loudly."""

from __future__ import annotations

import pytest
import torch

import ocrkernels
from ocrkernels import ops

needs_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="ocrkernels._C is not built")


@needs_ext
def test_auto_picks_cpu_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert ocrkernels.available_backends("cpu") == ["cpu", "reference"]
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"


@needs_ext
def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    # an explicit backend wins over the environment
    assert ops.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    monkeypatch.setenv(ops.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=ops.BACKEND_ENV):
        ops.resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend():
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        ocrkernels.spatial_gather(p, f, backend="gpu")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_says_why(backend):
    p, f = torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' is not available: .+"):
        ocrkernels.spatial_gather(p, f, backend=backend)


@needs_ext
def test_backends_agree():
    p, f = torch.randn(2, 5, 9, 11) * 2, torch.randn(2, 7, 9, 11)
    torch.testing.assert_close(ocrkernels.spatial_gather(p, f, backend="cpu"),
                               ocrkernels.spatial_gather(p, f, backend="reference"),
                               rtol=1e-5, atol=1e-6)
