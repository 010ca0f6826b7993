"""The Triton eval-mode object attention, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1), against the reference block (README: "How a kernel is judged").

The shapes are small (the interpreter runs numpy per tile) but keep every masked edge: C, D
and N not multiples of the 16-wide tiles, K=1, K above one 16-class tile, B > 1. bf16 runs
with the dots upcast to float32 under the interpreter (its tl.dot treats bf16 as integers);
tests/test_triton_aot.py compiles the native bf16 path for the GPU.
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
from ocrkernels.ops import fold_conv_bn  # noqa: E402
from ocrkernels.triton.object_attention import object_attention_eval  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_modules import randomise_batchnorm  # noqa: E402
from test_object_attention import make_block, run  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """ObjectAttention picks its kernel through backend "auto"; OCRKERNELS_BACKEND=triton
    makes that the Triton one, runnable on CPU tensors through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OCRKERNELS_BACKEND", "triton")


# (B, C, D, K, H, W)
SHAPES = [
    (1, 40, 24, 5, 5, 7),
    (2, 24, 16, 1, 3, 6),
    (1, 20, 12, 19, 4, 5),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape):
    B, C, D, K, H, W = shape
    block = make_block(C, D)
    feats, regions = torch.randn(B, C, H, W), torch.randn(B, C, K, 1)
    exact = run(block.double(), feats.double(), regions.double(), False)
    block.float()
    got = run(block, feats, regions, True)
    assert got.shape == (B, C, H, W) and got.dtype == torch.float32
    assert rel_err(got, exact) < 1e-5


def test_fp64_is_exact():
    block = make_block(24, 8, torch.float64)
    feats = torch.randn(2, 24, 3, 7, dtype=torch.float64)
    regions = torch.randn(2, 24, 3, 1, dtype=torch.float64)
    got = run(block, feats, regions, True)
    assert got.dtype == torch.float64
    assert rel_err(got, run(block, feats, regions, False)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_reference(dtype):
    """fp16 with fp16 products and fp32 accumulation (bf16: float32-upcast products under the
    interpreter): error vs float64 at most 2x the reference's in that dtype."""
    block = make_block(32, 16)
    feats, regions = torch.randn(1, 32, 4, 9), torch.randn(1, 32, 6, 1)
    exact = run(block.double(), feats.double(), regions.double(), False)
    block.to(dtype)
    got = run(block, feats.to(dtype), regions.to(dtype), True)
    plain = run(block, feats.to(dtype), regions.to(dtype), False)
    assert got.dtype == dtype
    assert rel_err(got, exact) <= 2 * rel_err(plain, exact) + torch.finfo(dtype).eps


def test_non_contiguous_and_channels_last_feats():
    block = make_block(24, 16)
    regions = torch.randn(2, 3, 24, 1).permute(0, 2, 1, 3)  # non-contiguous (B, C, K, 1)
    channels_last = torch.randn(2, 5, 7, 24).permute(0, 3, 1, 2)  # (B, C, N) view, stride C
    transposed = torch.randn(2, 24, 7, 5).transpose(2, 3)  # no (B, C, N) view: one copy
    for feats in (channels_last, transposed):
        assert feats.shape == (2, 24, 5, 7) and not feats.is_contiguous()
        got = run(block, feats, regions, True)
        expected = run(block, feats.contiguous(), regions.contiguous(), False)
        assert rel_err(got, expected) < 1e-5


def test_module_dispatches_to_the_triton_kernel(monkeypatch):
    """Eval without autograd runs the Triton op once per call; with autograd or in training
    the block runs other code (the reference / the training path)."""
    import ocrkernels.triton.object_attention as toa

    block = make_block(16, 8)
    feats, regions = torch.randn(1, 16, 3, 4), torch.randn(1, 16, 2, 1)
    calls = []
    real = toa.object_attention_eval

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(toa, "object_attention_eval", spy)
    run(block, feats, regions, True)
    assert len(calls) == 1
    block(feats, regions)  # grad enabled: reference
    assert len(calls) == 1


def test_ocr_head_end_to_end():
    """The whole head in eval (gather + attention on the Triton backend) equals the reference."""
    head = ocrkernels.OCRHead(12, 5, channels=24, ocr_channels=16).eval()
    randomise_batchnorm(head)
    x, coarse = torch.randn(1, 12, 5, 6), torch.randn(1, 5, 5, 6)
    with torch.no_grad():
        head.fused = False
        expected = head.double()(x.double(), coarse.double())
        head.float()
        head.fused = True
        got = head(x, coarse)
    assert rel_err(got, expected) < 1e-5


def _raw_args(C=16, D=8, K=3, B=2):
    block = make_block(C, D)
    regions = torch.randn(B, C, K, 1)
    with torch.no_grad():
        key = block.key_project(regions).flatten(2)
        value = block.value_project(regions).flatten(2)
        w_out, b_out = fold_conv_bn(block.out_project, torch.float32)
        wb, bb = fold_conv_bn(block.bottleneck, torch.float32)
        return dict(feats=torch.randn(B, C, 3, 5),
                    **dict(zip(("query_w1", "query_b1"),
                               fold_conv_bn(block.query_project[0], torch.float32))),
                    **dict(zip(("query_w2", "query_b2"),
                               fold_conv_bn(block.query_project[1], torch.float32))),
                    keys=(key.transpose(1, 2) * D ** -0.5).contiguous(),
                    values=(w_out @ value + b_out[:, None]).contiguous(),
                    out_w_context=wb[:, :C].contiguous(), out_w_feats=wb[:, C:].contiguous(),
                    out_b=bb)


@pytest.mark.skipif(not ocrkernels.ops.extension_loaded(), reason="ocrkernels._C is not built")
def test_raw_op_matches_the_cpu_op():
    args = _raw_args()
    got = object_attention_eval(*args.values())
    expected = torch.ops.ocrkernels.object_attention_eval(*args.values())
    assert rel_err(got, expected) < 1e-5


def test_opcheck():
    torch.library.opcheck(torch.ops.ocrkernels_triton.object_attention_eval.default,
                          tuple(_raw_args().values()),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("bad", ["query_w1", "keys", "values", "out_b", "dtype"])
def test_raw_op_rejects_bad_arguments(bad):
    args = _raw_args()
    if bad == "dtype":
        args["query_b2"] = args["query_b2"].double()
        match = "dtype of feats"
    else:
        args[bad] = args[bad][..., :-1]
        match = f"{bad} must have shape"
    with pytest.raises(RuntimeError, match=match):
        object_attention_eval(*args.values())
