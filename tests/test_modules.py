"""OCRHead and friends: mmsegmentation's names, and mmsegmentation's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ocrkernels
from conftest import rel_err, shared_path

FIXTURE = ("fixtures", "mmseg_ocrnet_hr18s")


def load_decode_head_state(index: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(shared_path(*FIXTURE, "ocrnet_hr18s_cityscapes_randinit.pth"),
                      weights_only=True)
    prefix = f"decode_head.{index}."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_array(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(shared_path(*FIXTURE, name)))


def randomise_batchnorm(module: torch.nn.Module, mean_scale: float = 0.1,
                        bias_scale: float = 0.1) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval mode tests something: running
    means and biases normal with the given scales, variances and weights uniform in [0.5, 1.5).
    Returns `module`."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * mean_scale)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * bias_scale)
    return module


def test_state_dict_keys_are_mmsegmentation_keys():
    theirs = load_decode_head_state(1)
    head = ocrkernels.OCRHead(in_channels=270, num_classes=19)
    assert set(head.state_dict()) == set(theirs)
    for k, v in head.state_dict().items():
        assert v.shape == theirs[k].shape, k
    head.load_state_dict(theirs, strict=True)


def test_ocr_head_reproduces_mmsegmentation_logits():
    """Backbone features and auxiliary logits saved by mmsegmentation in, its OCR logits out."""
    feats = [load_array(f"backbone_feat{i}_{shape}.npy") for i, shape in
             enumerate(["1x18x128x256", "1x36x64x128", "1x72x32x64", "1x144x16x32"])]
    aux = load_array("aux_logits_1x19x128x256.npy")
    expected = load_array("ocr_logits_1x19x128x256.npy")
    # mmsegmentation's resize_concat input transform of the HRNet outputs
    size = feats[0].shape[2:]
    x = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                for f in feats[1:]], dim=1)
    head = ocrkernels.OCRHead(in_channels=270, num_classes=19).eval()
    head.load_state_dict(load_decode_head_state(1), strict=True)
    for fused in (False, True):
        head.fused = fused
        with torch.no_grad():
            got = head(x, aux)
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= 1e-4, f"fused={fused}"


@pytest.mark.parametrize("shape", [(1, 19, 270, 32, 64), (3, 1, 48, 7, 9), (2, 150, 64, 13, 11)])
def test_fused_head_equals_reference_head(shape):
    B, K, C_in, H, W = shape
    head = ocrkernels.OCRHead(C_in, K, channels=64, ocr_channels=32).eval()
    randomise_batchnorm(head)
    x = torch.randn(B, C_in, H, W)
    coarse = torch.randn(B, K, H, W) * 3
    with torch.no_grad():
        head.fused = False
        ref = head(x, coarse)
        head.fused = True
        got = head(x, coarse)
    assert rel_err(got, ref) < 1e-5


def test_fused_head_trains_like_reference_head():
    """Training mode: same outputs, input and parameter gradients, BN running stats."""
    torch.manual_seed(0)
    heads = []
    for fused in (False, True):
        torch.manual_seed(0)
        heads.append(ocrkernels.OCRHead(40, 7, channels=32, ocr_channels=16, fused=fused).train())
    x = torch.randn(2, 40, 15, 17)
    coarse = torch.randn(2, 7, 15, 17) * 2
    results = []
    for head in heads:
        xi = x.clone().requires_grad_(True)
        ci = coarse.clone().requires_grad_(True)
        out = head(xi, ci)
        out.square().mean().backward()
        results.append((out, xi.grad, ci.grad, [p.grad for p in head.parameters()],
                        [b.clone() for b in head.buffers()]))
    (o0, x0, c0, p0, b0), (o1, x1, c1, p1, b1) = results
    assert rel_err(o1, o0) < 1e-5
    assert rel_err(x1, x0) < 1e-4 and rel_err(c1, c0) < 1e-4
    for a, b in zip(p1, p0):
        assert rel_err(a, b) < 1e-4
    for a, b in zip(b1, b0):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_fused_flag_switches_backend_and_keeps_state():
    head = ocrkernels.OCRHead(16, 3, channels=8, ocr_channels=4, fused=True)
    keys = head.state_dict().keys()
    assert head.spatial_gather_module.fused
    head.fused = False
    assert not head.spatial_gather_module.fused
    assert head.state_dict().keys() == keys


def test_dropout_only_when_configured():
    assert ocrkernels.OCRHead(8, 3, channels=8, ocr_channels=4).dropout is None
    head = ocrkernels.OCRHead(8, 3, channels=8, ocr_channels=4, dropout_ratio=0.1)
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


def test_spatial_gather_module_matches_functional():
    probs, feats = torch.randn(2, 5, 6, 7), torch.randn(2, 9, 6, 7)
    module = ocrkernels.SpatialGather(scale=0.5)
    torch.testing.assert_close(module(feats, probs),
                               ocrkernels.reference.spatial_gather(probs, feats, 0.5),
                               rtol=1e-5, atol=1e-6)


def test_object_attention_by_hand():
    """One pixel, one region, identity-like projections: the formula of
    ocrkernels/reference.py by hand."""
    C, D = 2, 2
    block = ocrkernels.ObjectAttention(C, D).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
            n = min(m.weight.shape[0], m.weight.shape[1])
            m.weight.data[:n, :n, 0, 0] = torch.eye(n)
    # With eval BN at init (mean 0, var 1) each CBR is relu(x / sqrt(1 + eps)).
    feats = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    regions = torch.tensor([[3.0], [0.5]]).view(1, 2, 1, 1)
    s = (1 + 1e-5) ** -0.5
    value = regions.view(2) * s
    context = value * s                    # softmax over one region is 1; out_project is a CBR
    bottleneck_in = torch.cat([context, feats.view(2)])
    expected = torch.relu(bottleneck_in[:2] * s)   # eye(2) picks the context half
    with torch.no_grad():
        got = block(feats, regions).view(2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["channels", "coarse_classes", "coarse_size"])
def test_head_rejects_bad_shapes(bad):
    head = ocrkernels.OCRHead(16, 3, channels=8, ocr_channels=4)
    x, coarse = torch.randn(1, 16, 5, 6), torch.randn(1, 3, 5, 6)
    if bad == "channels":
        x = torch.randn(1, 15, 5, 6)
        match = r"feats must have shape \(B, 16, H, W\)"
    elif bad == "coarse_classes":
        coarse = torch.randn(1, 4, 5, 6)
        match = r"coarse_logits must have shape \(B, 3, H, W\)"
    else:
        coarse = torch.randn(1, 3, 5, 7)
        match = r"coarse_logits must have shape"
    with pytest.raises(ValueError, match=match):
        head(x, coarse)


def test_object_attention_rejects_bad_regions():
    block = ocrkernels.ObjectAttention(8, 4)
    with pytest.raises(ValueError, match=r"regions must have shape \(B, C, K, 1\)"):
        block(torch.randn(1, 8, 3, 3), torch.randn(1, 8, 5, 2))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dtype_and_device_mismatches_are_clear_errors(training):
    head = ocrkernels.OCRHead(8, 3, channels=16, ocr_channels=8).train(training)
    x, coarse = torch.randn(1, 8, 4, 5), torch.randn(1, 3, 4, 5)
    with pytest.raises(ValueError, match="feats has dtype torch.float64"):
        head(x.double(), coarse.double())
    with pytest.raises(ValueError, match="coarse_logits has dtype torch.float16"):
        head(x, coarse.half())
    with pytest.raises(ValueError, match="feats is on meta"):
        head(x.to("meta"), coarse)
    block = head.object_context_block
    with pytest.raises(ValueError, match="regions has dtype torch.float64"):
        block(torch.randn(1, 16, 4, 5), torch.randn(1, 16, 3, 1, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast may mix dtypes on purpose
        assert head(x.bfloat16(), coarse.bfloat16()).shape == (1, 3, 4, 5)
