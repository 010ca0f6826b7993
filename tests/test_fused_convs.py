"""ocrnet.inference.fused_convs: the backbone's folded residual blocks and conv-ReLU pairs as
oneDNN convolutions with fused ReLU and residual sum, against the modules they replace."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import ocrnet
from conftest import rel_err
from ocrnet.inference.fastpath import fold_batchnorm
from ocrnet.inference.fused_convs import ConvReLU, FusedResidualBlock, fuse_backbone, \
    fusion_available
from ocrnet.models import build_segmentor
from ocrnet.models.resnet import BasicBlock, Bottleneck
from test_modules import randomise_batchnorm

pytestmark = pytest.mark.skipif(not fusion_available(), reason="torch without oneDNN (mkldnn)")
CL = torch.channels_last


def _randomise(module: nn.Module) -> nn.Module:
    return randomise_batchnorm(module, mean_scale=0.2, bias_scale=0.2).eval()


def _downsample(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


@pytest.mark.parametrize("block", [
    lambda: BasicBlock(8, 8),
    lambda: BasicBlock(8, 12, stride=2, downsample=_downsample(8, 12, 2)),
    lambda: Bottleneck(16, 4),
    lambda: Bottleneck(8, 6, stride=2, downsample=_downsample(8, 24, 2)),
    lambda: Bottleneck(16, 4, dilation=2),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_residual_block_is_the_block(block, layout):
    block = _randomise(block())
    x = torch.randn(2, block.conv1.in_channels, 13, 18)
    with torch.no_grad():
        want = block(x)
        fold_batchnorm(block)
        fused = FusedResidualBlock(block)
        if layout == "channels_last":
            fused = fused.to(memory_format=CL)
            x = x.contiguous(memory_format=CL)
        got = fused(x)
    assert got.shape == want.shape
    assert (got == 0).any() and (got > 0).any()
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("relu", [False, True])
def test_conv_relu_is_the_convolution(relu):
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1).eval()
    x = torch.randn(1, 6, 11, 15)
    with torch.no_grad():
        want = conv(x)
        got = ConvReLU(conv, relu)(x)
        residual = torch.randn_like(want)
        got_sum = ConvReLU(conv, relu)(x, residual)
    assert rel_err(got, torch.relu(want) if relu else want) <= 1e-6
    assert rel_err(got_sum, torch.relu(want + residual)) <= 1e-6


def test_private_shortcuts_are_overwritten_and_shared_inputs_are_not():
    """The last convolution may write over a private shortcut map (in-place sum) with the
    same bits as the fresh-output form; a block input that is not private is left alone."""
    layer = nn.Sequential(Bottleneck(8, 4, stride=2, downsample=_downsample(8, 16, 2)),
                          Bottleneck(16, 4), Bottleneck(16, 4))
    layer = _randomise(layer)
    x = torch.randn(1, 8, 17, 20).contiguous(memory_format=CL)
    with torch.no_grad():
        want = layer(x)
        fold_batchnorm(layer)
        fuse_backbone(layer)
        layer = layer.to(memory_format=CL)
        assert [b.input_is_private for b in layer] == [False, True, True]
        kept = x.clone()
        got = layer(x)
        assert torch.equal(x, kept)  # the layer's own input: read, never written
        # Bit for bit the fresh-output form (every block without the private flag).
        block = layer[1]
        inp = layer[0](x)
        block.input_is_private = False
        fresh = block(inp)
        assert torch.equal(inp, layer[0](x))
        block.input_is_private = True
        same = block(inp)  # writes over inp, returns it
        assert same.data_ptr() == inp.data_ptr() and torch.equal(same, fresh)
    assert rel_err(got, want) <= 1e-6


def test_fuse_backbone_replaces_every_block_and_keeps_the_function():
    model = _randomise(build_segmentor("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", fused=False))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = model.backbone(x)
        fold_batchnorm(model)
        replaced = fuse_backbone(model.backbone)
        got = model.backbone(x)
    assert replaced > 50
    assert not any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.backbone.modules())
    # Every convolution, the fuse layers' (conv, folded BN, Upsample) included, runs fused.
    assert not any(isinstance(m, nn.Conv2d) for m in model.backbone.modules())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_the_fast_path_fuses_the_backbone_on_cpu_in_channels_last():
    model = build_segmentor("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", fused=False).eval()
    fast = ocrnet.prepare_for_inference(model)
    assert any(isinstance(m, FusedResidualBlock) for m in fast.backbone.modules())
    plain = ocrnet.prepare_for_inference(model, channels_last=False)
    assert not any(isinstance(m, (FusedResidualBlock, ConvReLU)) for m in plain.modules())


def _channels_last_conv_relu():
    conv = nn.Conv2d(12, 20, 3, padding=1).eval()
    return conv, ConvReLU(conv, relu=True).to(memory_format=CL)


def test_prepacked_weights_give_the_plain_weights_bits_per_shape():
    conv, fused = _channels_last_conv_relu()
    xs = [torch.randn(1, 12, h, w).contiguous(memory_format=CL) for h, w in ((9, 14), (16, 5))]
    with torch.no_grad():
        for x in xs:
            plain = torch.ops.mkldnn._convolution_pointwise(
                x, fused.weight, fused.bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            assert torch.equal(fused(x), plain)
            assert rel_err(fused(x), torch.relu(conv(x))) <= 1e-6
    assert len(fused._packed) == 2  # one prepacked weight per input shape


def test_prepacked_weights_follow_weight_changes_copies_and_gradients():
    conv, fused = _channels_last_conv_relu()
    x = torch.randn(2, 12, 7, 10).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)
        assert len(fused._packed) == 1
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert clone._packed == {}
            assert torch.equal(clone(x), fused(x))
        fused.weight.mul_(-1)  # in place: the cached packing is stale
        conv.weight.mul_(-1)
        assert rel_err(fused(x), torch.relu(conv(x))) <= 1e-6
        fused.double()
        assert fused._packed == {}
        fused.float()


@pytest.mark.parametrize("with_residual", [False, True])
def test_conv_relu_differentiates_like_the_convolution(with_residual):
    """oneDNN's fused op has no derivative; with autograd the plain convolution runs."""
    conv, fused = _channels_last_conv_relu()
    x = torch.randn(2, 12, 7, 10).contiguous(memory_format=CL).requires_grad_()
    residual = torch.randn(2, 20, 7, 10, requires_grad=True) if with_residual else None
    got = fused(x, residual)
    got_grads = torch.autograd.grad(got.square().sum(), [x] + ([residual] if with_residual else []))
    z = conv(x) + residual if with_residual else conv(x)
    want = torch.relu(z)
    want_grads = torch.autograd.grad(want.square().sum(),
                                     [x] + ([residual] if with_residual else []))
    assert rel_err(got, want) <= 1e-6
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-5


def test_conv_relu_compiles_and_exports():
    """Under torch.compile and torch.export the plain ops run (oneDNN's fused residual op has
    no fake implementation); inductor fuses them itself."""
    conv, fused = _channels_last_conv_relu()
    x = torch.randn(1, 12, 9, 14).contiguous(memory_format=CL)
    residual = torch.randn(1, 20, 9, 14)
    with torch.no_grad():
        want = torch.relu(conv(x) + residual)
        assert rel_err(torch.compile(fused)(x, residual), want) <= 1e-5
        program = torch.export.export(fused, (x, residual))
    assert not any("mkldnn" in str(n.target) for n in program.graph.nodes)
    assert rel_err(program.module()(x, residual), want) <= 1e-5
