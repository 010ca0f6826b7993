"""The fused CPU spatial gather against the plain-PyTorch reference
(README: "How a kernel is judged")."""

from __future__ import annotations

import pytest
import torch

import ocrkernels
from ocrkernels import reference
from conftest import (assert_compile_matches_eager, forward_backward, make_inputs, ref64,
                      rel_err, saved_bytes_beyond_inputs)

pytestmark = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                                reason="ocrkernels._C is not built")

MAX_CHUNK = 2048  # the CPU kernel's largest chunk of pixels (8 or more chunks below that N)

# (B, K, C, H, W): K=1, odd sizes, N not a multiple of any block, N over several chunks, B>1.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 1, 8, 3, 5),
    (2, 3, 5, 7, 11),
    (3, 19, 33, 13, 17),
    (1, 150, 20, 9, 31),
    (2, 19, 64, 45, 101),             # N = 4545: chunks of 576 (two tiles each), a ragged last
    (1, 5, 7, 1, MAX_CHUNK + 1),      # chunks of 320 pixels and a ragged last one
    (1, 3, 4, 1, 8 * MAX_CHUNK + 1),  # full-size chunks of four tiles, then one pixel
    (1, 21, 512, 31, 37),
    (2, 40, 64, 32, 32),              # class-major partials; N % 16 == 0: streamed grad_feats
    (1, 3, 256, 64, 64),              # a 4 MiB grad_feats, advised onto huge pages
]


def cpu_op(p, f, s):
    return ocrkernels.spatial_gather(p, f, s, backend="cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_matches_reference_fp32(shape, scale):
    probs, feats, grad = make_inputs(*shape)
    out, gp, gf = forward_backward(cpu_op, probs, feats, grad, scale)
    r_out, r_gp, r_gf = forward_backward(ref64, probs, feats, grad.double(), scale)
    B, K, C, H, W = shape
    assert out.shape == (B, C, K, 1) and out.dtype == torch.float32
    assert gp.shape == probs.shape and gf.shape == feats.shape
    assert rel_err(out, r_out) < 1e-5
    assert rel_err(gp, r_gp) < 1e-5
    assert rel_err(gf, r_gf) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:6], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp64(shape):
    probs, feats, grad = make_inputs(*shape, dtype=torch.float64)
    out, gp, gf = forward_backward(cpu_op, probs, feats, grad)
    r_out, r_gp, r_gf = forward_backward(ref64, probs, feats, grad)
    assert out.dtype == torch.float64
    for a, e in ((out, r_out), (gp, r_gp), (gf, r_gf)):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 19, 48, 21, 23), (1, 150, 32, 17, 19), (1, 3, 16, 1, 2500)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
def test_low_precision_error_at_most_twice_reference(shape, dtype):
    """README, "How a kernel is judged": error against float64 at most 2x that of the reference
    run in the same dtype."""
    probs, feats, grad = make_inputs(*shape, dtype=dtype)
    out, gp, gf = forward_backward(cpu_op, probs, feats, grad)
    lo_out, lo_gp, lo_gf = forward_backward(reference.spatial_gather, probs, feats, grad)
    r_out, r_gp, r_gf = forward_backward(ref64, probs, feats, grad.double())
    assert out.dtype == dtype and gp.dtype == dtype and gf.dtype == dtype
    eps = torch.finfo(dtype).eps
    for ours, plain, exact in ((out, lo_out, r_out), (gp, lo_gp, r_gp), (gf, lo_gf, r_gf)):
        # the floor keeps the bound meaningful where the reference happens to round exactly
        assert rel_err(ours, exact) <= 2 * rel_err(plain, exact) + eps


def test_non_contiguous_and_channels_last():
    B, K, C, H, W = 2, 7, 24, 13, 19
    base_p = torch.randn(B, H, W, 2 * K) * 3
    base_f = torch.randn(B, C, W, H)
    probs = base_p.permute(0, 3, 1, 2)[:, ::2]           # strided, non-contiguous
    feats = base_f.transpose(2, 3)                        # transposed spatial dims
    assert not probs.is_contiguous() and not feats.is_contiguous()
    grad = torch.randn(B, K, C, 1).permute(0, 2, 1, 3)   # non-contiguous grad_out
    out, gp, gf = forward_backward(cpu_op, probs, feats, grad)
    r_out, r_gp, r_gf = forward_backward(ref64, probs, feats, grad.double())
    for a, e in ((out, r_out), (gp, r_gp), (gf, r_gf)):
        assert rel_err(a, e) < 1e-5
    cl_p = probs.contiguous(memory_format=torch.channels_last)
    cl_f = feats.contiguous(memory_format=torch.channels_last)
    out_cl, gp_cl, gf_cl = forward_backward(cpu_op, cl_p, cl_f, grad)
    for a, e in ((out_cl, r_out), (gp_cl, r_gp), (gf_cl, r_gf)):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_logits_stay_finite(magnitude):
    """Logits of +-1e4 must not overflow: the softmax runs with running maxima."""
    B, K, C, H, W = 2, 6, 16, 37, 61
    probs = (torch.rand(B, K, H, W, dtype=torch.float64) * 2 - 1) * magnitude
    feats = torch.randn(B, C, H, W, dtype=torch.float64)
    grad = torch.randn(B, C, K, 1, dtype=torch.float64)
    out, gp, gf = forward_backward(cpu_op, probs.float(), feats.float(), grad.float())
    plain = forward_backward(reference.spatial_gather, probs.float(), feats.float(), grad.float())
    exact = forward_backward(ref64, probs.float(), feats.float(), grad.double())
    for ours, ref32, ref in zip((out, gp, gf), plain, exact):
        assert torch.isfinite(ours).all()
        assert rel_err(ours, ref) <= 2 * rel_err(ref32, ref) + 1e-5


def test_softmax_weights_hand_checked():
    """Two pixels, one class: weights softmax([0, ln 3]) = [1/4, 3/4]."""
    probs = torch.tensor([0.0, torch.log(torch.tensor(3.0)).item()]).view(1, 1, 1, 2)
    feats = torch.tensor([[4.0, 8.0], [1.0, -1.0]]).view(1, 2, 1, 2)
    out = ocrkernels.spatial_gather(probs, feats, backend="cpu")
    torch.testing.assert_close(out.view(2), torch.tensor([7.0, -0.5]), rtol=1e-6, atol=1e-6)


def test_gradcheck_fp64():
    for shape in [(1, 1, 2, 2, 3), (2, 3, 4, 3, 5)]:
        probs, feats, _ = make_inputs(*shape, dtype=torch.float64)
        p = probs.requires_grad_(True)
        f = feats.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: cpu_op(a, b, 0.7), (p, f))


def test_gradcheck_fp64_across_chunks():
    probs, feats, _ = make_inputs(1, 2, 2, 1, MAX_CHUNK + 3, dtype=torch.float64)
    p = probs.requires_grad_(True)
    f = feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cpu_op(a, b, 1.0), (p, f), fast_mode=True)


@pytest.mark.parametrize("op", ["spatial_gather", "spatial_gather_forward"])
def test_opcheck(op):
    probs, feats, _ = make_inputs(2, 5, 6, 7, 9)
    probs.requires_grad_(op == "spatial_gather")
    feats.requires_grad_(op == "spatial_gather")
    torch.library.opcheck(getattr(torch.ops.ocrkernels, op).default, (probs, feats, 1.0))


def test_opcheck_backward():
    probs, feats, grad = make_inputs(2, 5, 6, 7, 9)
    _, lse = torch.ops.ocrkernels.spatial_gather_forward(probs, feats, 1.0)
    torch.library.opcheck(torch.ops.ocrkernels.spatial_gather_backward.default,
                          (grad, probs, feats, lse, 1.0))


def test_lse_is_the_only_saved_state():
    """What autograd keeps beyond the inputs is the (B, K, 2) log-sum-exp, nothing of size N."""
    B, K, C, H, W = 2, 19, 32, 33, 65
    probs, feats, _ = make_inputs(B, K, C, H, W)
    assert saved_bytes_beyond_inputs(lambda p, f: ocrkernels.spatial_gather(p, f, backend="cpu"),
                                     probs, feats) == B * K * 2 * 4


def test_torch_compile_fullgraph():
    assert_compile_matches_eager("cpu", *make_inputs(2, 19, 12, 9, 14)[:2])


def test_deterministic_bits_and_thread_count_independent():
    probs, feats, grad = make_inputs(2, 19, 40, 50, 90)  # 4500 pixels: three chunks
    runs = [forward_backward(cpu_op, probs, feats, grad) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs.append(forward_backward(cpu_op, probs, feats, grad))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---- bad input --------------------------------------------------------------------------


BAD_INPUTS = [
    # (probs shape, feats shape, dtypes, expected words in the message)
    ((2, 3, 4), (2, 5, 4, 1), None, "probs must have shape (B, K, H, W)"),
    ((2, 3, 4, 5), (2, 5, 20), None, "feats must have shape (B, C, H, W)"),
    ((2, 3, 4, 5), (1, 6, 4, 5), None, "feats must have shape"),
    ((2, 3, 4, 5), (2, 6, 4, 6), None, "feats must have shape"),
    ((2, 0, 4, 5), (2, 6, 4, 5), None, "K >= 1"),
    ((0, 3, 4, 5), (0, 6, 4, 5), None, "empty batch"),
    ((1, 3, 0, 5), (1, 6, 0, 5), None, "H*W"),
    ((1, 3, 4, 5), (1, 6, 4, 5), (torch.float32, torch.float64), "dtype"),
    ((1, 3, 4, 5), (1, 6, 4, 5), (torch.int64, torch.int64), "float32, float64"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[3])
def test_bad_input_raises_clear_error(backend, case):
    p_shape, f_shape, dtypes, words = case
    dp, df = dtypes or (torch.float32, torch.float32)
    probs = torch.zeros(p_shape, dtype=dp)
    feats = torch.zeros(f_shape, dtype=df)
    with pytest.raises(ValueError) as info:
        ocrkernels.spatial_gather(probs, feats, backend=backend)
    assert words in str(info.value)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[3])
def test_bad_input_to_raw_op_raises_runtime_error(case):
    """Calling torch.ops directly skips the Python checks: the C++ checks must catch it."""
    p_shape, f_shape, dtypes, _ = case
    dp, df = dtypes or (torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="spatial_gather"):
        torch.ops.ocrkernels.spatial_gather(torch.zeros(p_shape, dtype=dp),
                                            torch.zeros(f_shape, dtype=df), 1.0)


def test_bad_backward_arguments():
    probs, feats, grad = make_inputs(1, 3, 4, 5, 6)
    _, lse = torch.ops.ocrkernels.spatial_gather_forward(probs, feats, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(B, C, K, 1\)"):
        torch.ops.ocrkernels.spatial_gather_backward(grad[:, :2], probs, feats, lse, 1.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(B, K, 2\)"):
        torch.ops.ocrkernels.spatial_gather_backward(grad, probs, feats, lse[:, :1], 1.0)


def test_wrong_argument_types():
    probs, feats, _ = make_inputs(1, 3, 4, 5, 6)
    with pytest.raises(TypeError, match="feats must be a torch.Tensor"):
        ocrkernels.spatial_gather(probs, feats.numpy())
    with pytest.raises(TypeError, match="scale must be a real number"):
        ocrkernels.spatial_gather(probs, feats, "1.0")
