"""ocrkernels::conv3x3_winograd, the F(4x4, 3x3) convolution of the inference fast path, against
``F.conv2d`` (README, "How a kernel is judged"): forward over a grid of shapes and layouts,
its rounding error against a float64 convolution, bits independent of the thread count,
non-finite values where the convolution puts them, autograd (the direct convolution's),
opcheck, torch.compile, export, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ocrkernels
from conftest import rel_err
from ocrkernels.winograd import WinogradConv2d, conv3x3_winograd, transform_weight, \
    winograd_applies

pytestmark = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                                reason="ocrkernels._C is not built")
ops = torch.ops.ocrkernels


def _case(B, C, H, W, O, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    w = torch.randn(O, C, 3, 3, generator=g, dtype=dtype) / (3 * C ** 0.5)
    b = torch.randn(O, generator=g, dtype=dtype) if bias else None
    return x, w, b


def _direct(x, w, b, relu):
    y = F.conv2d(x, w, b, padding=1)
    return F.relu(y) if relu else y


# (B, C, H, W, O): one pixel; H, W not multiples of 4 (cropped tiles); one channel in and out;
# a batch; a row of more than 64 tiles (W > 256: two blocks per tile row, the second partial).
SHAPES = [(1, 1, 1, 1, 1), (1, 3, 5, 7, 4), (2, 5, 9, 13, 3), (1, 1, 6, 6, 1),
          (3, 16, 17, 33, 8), (1, 7, 4, 8, 5), (1, 4, 3, 261, 6), (2, 9, 10, 300, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_float64_forward_is_the_convolution(shape, relu):
    x, w, b = _case(*shape)
    got = ops.conv3x3_winograd(x, w, transform_weight(w), b, relu)
    assert got.shape == (shape[0], shape[4], shape[2], shape[3])
    assert rel_err(got, _direct(x, w, b, relu)) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_float32_error_is_bounded(shape):
    """The transforms' extra rounding: measured against a float64 convolution, both paths'
    float32 errors; Winograd's is larger, but far inside the fast path's 1e-4."""
    x, w, b = _case(*shape, dtype=torch.float32)
    want = _direct(x.double(), w.double(), b.double(), False)
    got = ops.conv3x3_winograd(x, w, transform_weight(w), b, False)
    assert rel_err(got.double(), want) <= 5e-6
    assert rel_err(F.conv2d(x, w, b, padding=1).double(), want) <= 1e-6


def test_float32_error_at_the_ocrnet_bottleneck_width():
    """hr18s' bottleneck: 270 -> 512 channels. The error grows with the sum's length."""
    x, w, b = _case(1, 270, 20, 36, 512, dtype=torch.float32)
    want = _direct(x.double(), w.double(), b.double(), True)
    got = ops.conv3x3_winograd(x, w, transform_weight(w), b, True)
    assert rel_err(got.double(), want) <= 3e-5


def test_no_bias_and_layouts():
    x, w, _ = _case(2, 6, 11, 14, 5, dtype=torch.float32)
    want = F.conv2d(x, w, padding=1)
    u = transform_weight(w)
    for inp in (x.contiguous(memory_format=torch.channels_last),
                torch.randn(2, 6, 11, 28)[..., ::2].copy_(x)):  # strided
        assert not inp.is_contiguous()
        assert rel_err(ops.conv3x3_winograd(inp, w, u, None, False), want) <= 5e-6
    assert torch.equal(conv3x3_winograd(x, w), ops.conv3x3_winograd(x, w, u, None, False))


def test_bits_do_not_depend_on_the_thread_count():
    x, w, b = _case(2, 12, 21, 290, 10, dtype=torch.float32)
    u = transform_weight(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.conv3x3_winograd(x, w, u, b, True)
        torch.set_num_threads(max(2, threads))
        many = ops.conv3x3_winograd(x, w, u, b, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("where", ["input_nan", "input_inf", "input_-inf", "weight_inf",
                                   "bias_nan"])
def test_non_finite_values_land_where_the_convolution_puts_them(where):
    x, w, b = _case(1, 4, 9, 10, 3, dtype=torch.float32)
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[where.split("_")[1]]
    if where.startswith("input"):
        x[0, 1, 4, 5] = value
    elif where.startswith("weight"):
        w[1, 2, 0, 1] = value
    else:
        b[2] = value
    got = ops.conv3x3_winograd(x, w, transform_weight(w), b, False)
    want = F.conv2d(x, w, b, padding=1)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    assert (~got.isfinite()).any()
    fin = want.isfinite()
    assert rel_err(got[fin], want[fin]) <= 5e-6


def test_backward_is_the_convolutions():
    x, w, b = _case(2, 3, 7, 9, 4)
    for relu in (False, True):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = [t.clone().requires_grad_() for t in (x, w, b)]
        out = ops.conv3x3_winograd(args[0], args[1], transform_weight(w), args[2], relu)
        want = _direct(*ref, relu)
        grad = torch.randn_like(want)
        got_g = torch.autograd.grad(out, args, grad)
        want_g = torch.autograd.grad(want, ref, grad)
        for g1, g2 in zip(got_g, want_g):
            assert rel_err(g1, g2) <= 1e-12


def test_gradcheck():
    x, w, b = _case(1, 2, 5, 6, 3)
    for relu in (False, True):  # the transformed weight follows w, as in the module
        assert torch.autograd.gradcheck(
            lambda x, w, b: ops.conv3x3_winograd(x, w, transform_weight(w), b, relu),
            (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_opcheck():
    x, w, b = _case(2, 3, 6, 9, 4, dtype=torch.float32)
    u = transform_weight(w)
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, w, u, b, True))
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, w, u, None, False))


def test_module_compiles_and_exports():
    conv = nn.Conv2d(5, 7, 3, padding=1)
    module = WinogradConv2d(conv, relu=True).eval()
    x = torch.randn(1, 5, 10, 13)
    with torch.no_grad():
        want = F.relu(conv(x))
        got = module(x)
        compiled = torch.compile(module, fullgraph=True)(x)
    assert rel_err(got, want) <= 5e-6
    assert torch.equal(compiled, got)
    program = torch.export.export(module, (x,))
    assert any("conv3x3_winograd" in str(n.target) for n in program.graph.nodes)
    assert torch.equal(program.module()(x), got)


def test_applies_only_to_plain_3x3_convolutions():
    assert winograd_applies(nn.Conv2d(4, 4, 3, padding=1))
    for conv in (nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 3, padding=2,
                 dilation=2), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1),
                 nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        assert not winograd_applies(conv)
        with pytest.raises(ValueError, match="WinogradConv2d: conv must be 3x3"):
            WinogradConv2d(conv)


def test_bad_input_names_the_argument():
    x, w, b = _case(1, 3, 5, 5, 4, dtype=torch.float32)
    u = transform_weight(w)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(O, C=3, 3, 3\)"):
        ops.conv3x3_winograd(x, w[:, :2], u, b, False)
    with pytest.raises(RuntimeError, match=r"weight_winograd must have shape \(36, O=4, C=3\)"):
        ops.conv3x3_winograd(x, w, u[:, :3], b, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(O=4,\)"):
        ops.conv3x3_winograd(x, w, u, b[:3], False)
    with pytest.raises(RuntimeError, match="x must have shape"):
        ops.conv3x3_winograd(x[0], w, u, b, False)
    with pytest.raises(RuntimeError, match="weight must have dtype Float"):
        ops.conv3x3_winograd(x, w.double(), u, b, False)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.conv3x3_winograd(x.half(), w.half(), u.half(), b.half(), False)
    with pytest.raises(ValueError, match=r"transform_weight: weight must have shape"):
        transform_weight(torch.randn(4, 3, 1, 1))


def test_flop_count_is_the_direct_convolutions():
    from ocrkernels.flops import register_flop_formulas
    from torch.utils.flop_counter import FlopCounterMode
    register_flop_formulas()
    x, w, b = _case(1, 6, 8, 12, 5, dtype=torch.float32)
    u = transform_weight(w)
    with FlopCounterMode(display=False) as counter:
        ops.conv3x3_winograd(x, w, u, b, False)
    assert counter.get_total_flops() == 2 * 5 * 6 * 9 * 8 * 12
