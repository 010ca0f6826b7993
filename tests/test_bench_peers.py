"""bench/peers.py: the engines the whole-model bench times beside the fast path compute the
eager model's logits."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import REPO

from ocrnet.configs import SYNTHETIC_CONFIGS
from ocrnet.models import build_segmentor

sys.path.insert(0, str(REPO / "bench"))
from peers import PeerUnavailable, build_peer  # noqa: E402

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    return build_segmentor(SYNTHETIC_CONFIGS[TINY], fused=False).eval()


def _rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_compile_peer_matches_eager(eager):
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    peer, version = build_peer("compile", eager, x)
    with torch.no_grad():
        ref, out = eager(x), peer(x)
    assert "torch.compile" in version and "freezing" in version
    assert out.shape == ref.shape and _rel_err(out, ref) <= 1e-4
    # The eager model itself is left as it was (still eager, same weights).
    assert not isinstance(eager, torch._dynamo.eval_frame.OptimizedModule)


def test_onnxruntime_peer_matches_eager_or_says_why(eager):
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(2))
    have = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))
    if not have:
        # Without the optional packages the bench skips the row and names what to install.
        with pytest.raises(PeerUnavailable, match="onnx"):
            build_peer("onnxruntime", eager, x)
        return
    peer, version = build_peer("onnxruntime", eager, x)
    with torch.no_grad():
        ref = eager(x)
        out = peer(torch.randn(1, 3, 32, 64))  # another input: the session is not a constant
        out = peer(x)
    assert version.startswith("ONNX Runtime")
    assert out.shape == ref.shape and _rel_err(out, ref) <= 1e-4


def test_unknown_peer_is_refused(eager):
    with pytest.raises(ValueError, match="unknown peer 'tensorrt'"):
        build_peer("tensorrt", eager, torch.zeros(1, 3, 32, 64))
