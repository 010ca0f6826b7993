"""Shape inference without data: the public functional op and the modules run on meta tensors
and under FakeTensorMode, give the real call's shapes and dtypes, and validate their inputs from
shapes and dtypes alone (never reading a value, which meta and fake tensors do not have)."""

from __future__ import annotations

import os

# Before Triton's first import in this process (see tests/test_triton_spatial_gather.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import ocrkernels  # noqa: E402

B, K, C_IN, C, D, H, W = 2, 5, 24, 16, 8, 7, 9


def _backends() -> list[str]:
    """Every backend that can run on CPU tensors here, plus auto and reference."""
    names = ["auto", "reference"]
    if ocrkernels.ops.extension_loaded():
        names.append("cpu")
    from ocrkernels.triton import triton_import_error
    if triton_import_error() is None:
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spatial_gather_on_meta_tensors(backend, dtype):
    """Meta tensors carry no numbers: every backend name gives the real call's shapes, for the
    output and for both gradients."""
    probs = torch.empty(B, K, H, W, device="meta", dtype=dtype, requires_grad=True)
    feats = torch.empty(B, C, H, W, device="meta", dtype=dtype, requires_grad=True)
    out = ocrkernels.spatial_gather(probs, feats, backend=backend)
    assert out.shape == (B, C, K, 1) and out.dtype == dtype and out.device.type == "meta"
    gp, gf = torch.autograd.grad(out.sum(), (probs, feats))
    assert gp.shape == probs.shape and gf.shape == feats.shape


@pytest.mark.parametrize("env", ["cpu", "triton", "cuda", "reference"])
def test_the_environment_backend_does_not_stop_meta_tensors(env, monkeypatch):
    monkeypatch.setenv("OCRKERNELS_BACKEND", env)
    out = ocrkernels.spatial_gather(torch.empty(B, K, H, W, device="meta"),
                                    torch.empty(B, C, H, W, device="meta"))
    assert out.shape == (B, C, K, 1)


@pytest.mark.parametrize("bad, message", [
    (((B, K, H, W), (B + 1, C, H, W)), "feats must have shape"),
    (((B, K, H), (B, C, H, W)), "probs must have shape"),
    (((B, 0, H, W), (B, C, H, W)), "K >= 1"),
])
@pytest.mark.parametrize("device", ["meta", "fake"])
def test_bad_shapes_are_refused_from_the_shapes_alone(bad, message, device):
    (ps, fs) = bad

    def call():
        dev = "meta" if device == "meta" else "cpu"
        return ocrkernels.spatial_gather(torch.empty(ps, device=dev), torch.empty(fs, device=dev))

    with pytest.raises(ValueError, match=message):
        if device == "fake":
            with FakeTensorMode():
                call()
        else:
            call()


def test_a_dtype_mismatch_is_refused_on_meta_tensors():
    with pytest.raises(ValueError, match="feats must have the dtype of probs"):
        ocrkernels.spatial_gather(torch.empty(B, K, H, W, device="meta"),
                                  torch.empty(B, C, H, W, device="meta", dtype=torch.float64))


@pytest.mark.parametrize("backend", _backends())
def test_spatial_gather_under_fake_tensor_mode(backend):
    """Fake tensors keep their device (CPU here) and take the backend's real dispatch: the C++
    op's and the Triton op's registered fake implementations."""
    with FakeTensorMode():
        probs = torch.empty(B, K, H, W, requires_grad=True)
        feats = torch.empty(B, C, H, W, requires_grad=True)
        out = ocrkernels.spatial_gather(probs, feats, backend=backend)
        gp, gf = torch.autograd.grad(out.sum(), (probs, feats))
    assert out.shape == (B, C, K, 1) and gp.shape == probs.shape and gf.shape == feats.shape


def _head(recompute: bool) -> ocrkernels.OCRHead:
    return ocrkernels.OCRHead(C_IN, K, channels=C, ocr_channels=D, recompute=recompute)


def _run_head(head, feats, logits, train: bool, grad: bool):
    head.train(train)
    with torch.set_grad_enabled(grad):
        feats = feats.requires_grad_(grad)
        out = head(feats, logits)
        if grad:
            (g,) = torch.autograd.grad(out.sum(), feats)
            assert g.shape == feats.shape
    return out


MODES = [(True, True), (False, True), (False, False)]  # (train, autograd)
MODE_IDS = ["train", "eval-autograd", "eval-no-grad"]


@pytest.mark.parametrize("train, grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_ocr_head_on_meta_tensors(fused, recompute, train, grad):
    """A model built on the meta device (shape inference before loading weights): the fused
    training path included, whose autocast switch has no meta counterpart."""
    with torch.device("meta"):
        head = _head(recompute)
        feats, logits = torch.empty(B, C_IN, H, W), torch.empty(B, K, H, W)
    head.fused = fused
    out = _run_head(head, feats, logits, train, grad)
    assert out.shape == (B, K, H, W) and out.device.type == "meta"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("train, grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_ocr_head_under_fake_tensor_mode(backend, recompute, train, grad, monkeypatch):
    monkeypatch.setenv("OCRKERNELS_BACKEND", backend)
    with FakeTensorMode(allow_non_fake_inputs=True):
        head = _head(recompute)
        out = _run_head(head, torch.empty(B, C_IN, H, W), torch.empty(B, K, H, W), train, grad)
    assert out.shape == (B, K, H, W) and out.dtype == torch.float32


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_object_attention_and_spatial_gather_modules_on_meta(train):
    with torch.device("meta"):
        gather = ocrkernels.SpatialGather()
        block = ocrkernels.ObjectAttention(C, D).train(train)
        feats, logits = torch.empty(B, C, H, W), torch.empty(B, K, H, W)
    with torch.set_grad_enabled(train):
        regions = gather(feats, logits)
        assert regions.shape == (B, C, K, 1)
        assert block(feats, regions).shape == (B, C, H, W)
