"""The Triton spatial gather, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1),
against the plain-PyTorch reference (README: "How a kernel is judged").

The interpreter executes the kernel source itself (numpy), with the block sizes of
``kernels.INTERPRETER_CONFIG`` (16: several tiles of K, C and N in every shape below). What it
cannot show (GPU code generation, shared memory, tl.dot shape limits) is checked by
tests/test_triton_aot.py. bf16: the interpreter's tl.dot multiplies bf16 bit patterns as
integers, so under the interpreter bf16 runs with the dots upcast to float32 (``DOT_UP``); the
native-bf16 dots of the GPU path are covered by the compile check only.
"""

from __future__ import annotations

import os

# Before Triton's first import in this process: Triton builds its library functions for the
# interpreter then (pytest imports no Triton before collecting these modules).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

import ocrkernels  # noqa: E402
from ocrkernels import reference  # noqa: E402
from ocrkernels.triton import kernels  # noqa: E402
from ocrkernels.triton import spatial_gather as tsg  # noqa: E402
from conftest import (assert_compile_matches_eager, forward_backward,  # noqa: E402
                      make_inputs, ref64, rel_err, saved_bytes_beyond_inputs)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("OCRKERNELS_BACKEND", raising=False)


# (B, K, C, H, W): K=1; K=19 over two class tiles; C=33 over three channel tiles; N odd and
# not a multiple of the 16-pixel block; B > 1; one pixel.
SHAPES = [
    (1, 1, 3, 1, 1),
    (1, 1, 8, 3, 5),
    (2, 3, 5, 7, 11),
    (1, 19, 20, 9, 13),
    (2, 5, 33, 1, 37),
]


def triton_op(p, f, s):
    return ocrkernels.spatial_gather(p, f, s, backend="triton")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape):
    scale = 0.7
    probs, feats, grad = make_inputs(*shape)
    out, gp, gf = forward_backward(triton_op, probs, feats, grad, scale)
    r_out, r_gp, r_gf = forward_backward(ref64, probs, feats, grad.double(), scale)
    B, K, C, H, W = shape
    assert out.shape == (B, C, K, 1) and out.dtype == torch.float32
    assert gp.shape == probs.shape and gf.shape == feats.shape
    assert gp.dtype == gf.dtype == torch.float32
    assert rel_err(out, r_out) < 1e-5
    assert rel_err(gp, r_gp) < 1e-5
    assert rel_err(gf, r_gf) < 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 16, 10_000])
def test_any_pixel_split_gives_the_reference(chunk):
    """chunk = pixels per forward split: one pixel per split, ragged splits not a multiple of
    the block, exactly one block, a single split. The merge must undo every choice."""
    probs, feats, _ = make_inputs(2, 3, 18, 5, 9)
    out = tsg.spatial_gather(probs, feats, 1.0, chunk=chunk)
    assert rel_err(out, ref64(probs, feats, 1.0)) < 1e-5


def test_softmax_weights_hand_checked():
    """Two pixels, one class: weights softmax([0, ln 3]) = [1/4, 3/4]."""
    probs = torch.tensor([0.0, torch.log(torch.tensor(3.0)).item()]).view(1, 1, 1, 2)
    feats = torch.tensor([[4.0, 8.0], [1.0, -1.0]]).view(1, 2, 1, 2)
    out = ocrkernels.spatial_gather(probs, feats, backend="triton")
    torch.testing.assert_close(out.view(2), torch.tensor([7.0, -0.5]), rtol=1e-6, atol=1e-6)


def test_matches_reference_fp64():
    # scale 0.5: exact in float32, the type in which the kernels receive it
    probs, feats, grad = make_inputs(2, 19, 17, 5, 7, dtype=torch.float64)
    got = forward_backward(triton_op, probs, feats, grad, 0.5)
    exact = forward_backward(ref64, probs, feats, grad, 0.5)
    assert got[0].dtype == torch.float64
    for a, e in zip(got, exact):
        assert rel_err(a, e) < 1e-12


def test_gradcheck_fp64():
    probs, feats, _ = make_inputs(1, 2, 3, 2, 3, dtype=torch.float64)
    p, f = probs.requires_grad_(True), feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: triton_op(a, b, 0.5), (p, f), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 19, 24, 5, 9), (1, 3, 16, 1, 70)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
def test_low_precision_error_at_most_twice_reference(shape, dtype):
    """README, "How a kernel is judged": error against float64 at most 2x that of the reference
    run in the same dtype.
    fp16 runs the kernels' fp16 dots; bf16 the float32-upcast dots (see the module docstring),
    with bf16 loads and stores."""
    assert kernels.dot_upcast(dtype, interpreter=True) == (dtype == torch.bfloat16)
    probs, feats, grad = make_inputs(*shape, dtype=dtype)
    ours = forward_backward(triton_op, probs, feats, grad)
    plain = forward_backward(reference.spatial_gather, probs, feats, grad)
    exact = forward_backward(ref64, probs, feats, grad.double())
    eps = torch.finfo(dtype).eps
    for o, p, e in zip(ours, plain, exact):
        assert o.dtype == dtype
        assert rel_err(o, e) <= 2 * rel_err(p, e) + eps


def test_non_contiguous_and_channels_last():
    B, K, C, H, W = 2, 7, 20, 5, 7
    probs = (torch.randn(B, H, W, 2 * K) * 3).permute(0, 3, 1, 2)[:, ::2]  # strided
    feats = torch.randn(B, C, W, H).transpose(2, 3)  # spatial dims swapped: not a view of N
    grad = torch.randn(B, K, C, 1).permute(0, 2, 1, 3)
    assert not probs.is_contiguous() and not feats.is_contiguous() and not grad.is_contiguous()
    exact = forward_backward(ref64, probs, feats, grad.double())
    for p, f in ((probs, feats),
                 (probs.contiguous(memory_format=torch.channels_last),
                  feats.contiguous(memory_format=torch.channels_last))):
        for a, e in zip(forward_backward(triton_op, p, f, grad), exact):
            assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_logits_stay_finite(magnitude):
    """Logits of +-1e4 must not overflow: the softmax runs with running maxima per split."""
    B, K, C, H, W = 1, 4, 8, 6, 11
    probs = (torch.rand(B, K, H, W, dtype=torch.float64) * 2 - 1) * magnitude
    feats = torch.randn(B, C, H, W, dtype=torch.float64)
    grad = torch.randn(B, C, K, 1, dtype=torch.float64)
    ours = forward_backward(triton_op, probs.float(), feats.float(), grad.float())
    plain = forward_backward(reference.spatial_gather, probs.float(), feats.float(), grad.float())
    exact = forward_backward(ref64, probs.float(), feats.float(), grad)
    for o, p, e in zip(ours, plain, exact):
        assert torch.isfinite(o).all()
        assert rel_err(o, e) <= 2 * rel_err(p, e) + 1e-5


def test_deterministic_bits():
    """Per-split partials merged in split order: two runs give the same bits."""
    probs, feats, grad = make_inputs(2, 19, 24, 6, 9)
    runs = [forward_backward(triton_op, probs, feats, grad) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_saves_only_lse():
    """What autograd keeps beyond the inputs is the (B, K, 2) log-sum-exp, nothing of size N."""
    B, K, C, H, W = 2, 5, 12, 9, 13
    probs, feats, _ = make_inputs(B, K, C, H, W)
    assert saved_bytes_beyond_inputs(lambda p, f: triton_op(p, f, 1.0), probs, feats) == \
        B * K * 2 * 4


def test_opcheck_forward_with_autograd():
    probs, feats, _ = make_inputs(2, 5, 6, 3, 7)
    args = (probs.reshape(2, 5, 21).requires_grad_(True),
            feats.reshape(2, 6, 21).requires_grad_(True), 1.0, 8)
    torch.library.opcheck(torch.ops.ocrkernels_triton.spatial_gather_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_backward():
    probs, feats, grad = make_inputs(2, 5, 6, 3, 7)
    p, f = probs.reshape(2, 5, 21), feats.reshape(2, 6, 21)
    _, lse = torch.ops.ocrkernels_triton.spatial_gather_forward(p, f, 1.0, 8)
    torch.library.opcheck(torch.ops.ocrkernels_triton.spatial_gather_backward.default,
                          (grad.squeeze(3), p, f, lse, 1.0))


def test_torch_compile_fullgraph():
    """torch.compile traces through the public API (the op stays one node on CPU, where the
    kernels are interpreted; on CUDA triton_op exposes the kernels) with the same numbers."""
    assert_compile_matches_eager("triton", *make_inputs(2, 5, 8, 4, 6)[:2])


# ---- bad input --------------------------------------------------------------------------

def test_bad_input_raises_value_error_naming_the_argument():
    """The public checks run before the backend: same messages as every other backend."""
    probs, feats = torch.zeros(2, 3, 4, 5), torch.zeros(2, 6, 4, 6)
    with pytest.raises(ValueError, match="feats must have shape"):
        ocrkernels.spatial_gather(probs, feats, backend="triton")
    with pytest.raises(ValueError, match="dtype of probs"):
        ocrkernels.spatial_gather(probs, torch.zeros(2, 6, 4, 5, dtype=torch.float16),
                                  backend="triton")


@pytest.mark.parametrize("what, args, words", [
    ("shape", lambda p, f: (p, f[:1], 1.0, 4), "feats must have shape"),
    ("dtype", lambda p, f: (p, f.double(), 1.0, 4), "share one dtype"),
    ("chunk", lambda p, f: (p, f, 1.0, 0), "chunk must be >= 1"),
])
def test_raw_op_rejects_bad_arguments(what, args, words):
    p, f = torch.zeros(2, 3, 20), torch.zeros(2, 6, 20)
    with pytest.raises(RuntimeError, match=words):
        torch.ops.ocrkernels_triton.spatial_gather_forward(*args(p, f))


def test_raw_backward_rejects_bad_shapes():
    p, f = torch.randn(1, 3, 20), torch.randn(1, 4, 20)
    _, lse = torch.ops.ocrkernels_triton.spatial_gather_forward(p, f, 1.0, 8)
    grad = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(1, 4, 3\)"):
        torch.ops.ocrkernels_triton.spatial_gather_backward(grad[:, :2], p, f, lse, 1.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(1, 3, 2\)"):
        torch.ops.ocrkernels_triton.spatial_gather_backward(grad, p, f, lse[:, :1], 1.0)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    probs, feats, _ = make_inputs(1, 2, 3, 2, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ocrkernels.spatial_gather(probs, feats, backend="triton")
    # auto never picks the interpreter for CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" not in ocrkernels.available_backends("cpu")
