"""The fused eval-mode pixel-region attention against the reference block
(README: "How a kernel is judged")."""

from __future__ import annotations

import pytest
import torch

import ocrkernels
from ocrkernels.ops import fold_conv_bn
from conftest import rel_err
from test_modules import randomise_batchnorm

pytestmark = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                                reason="ocrkernels._C is not built")

# (B, C, D, K, H, W): Cityscapes / ADE20K channel sizes, odd sizes, K=1, B=3, N % 64 != 0, and
# N a multiple of the 64-pixel tile, where the output is written with streaming stores (with a
# 4 MiB output in the last, the size from which it is advised onto huge pages).
SHAPES = [
    (1, 512, 256, 19, 9, 23),
    (1, 512, 256, 150, 7, 11),
    (3, 48, 16, 1, 7, 9),
    (2, 40, 24, 5, 1, 1),
    (2, 72, 20, 21, 13, 17),
    (2, 64, 32, 19, 16, 16),
    (1, 512, 256, 150, 32, 64),
]


def make_block(C, D, dtype=torch.float32):
    block = ocrkernels.ObjectAttention(C, D).eval().to(dtype)
    randomise_batchnorm(block)
    return block


def run(block, feats, regions, fused):
    block.fused = fused
    with torch.no_grad():
        return block(feats, regions)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_eval_matches_reference(shape):
    B, C, D, K, H, W = shape
    block = make_block(C, D)
    feats = torch.randn(B, C, H, W)
    regions = torch.randn(B, C, K, 1)
    ref64 = run(block.double(), feats.double(), regions.double(), False)
    block.float()
    got = run(block, feats, regions, True)
    plain = run(block, feats, regions, False)
    assert got.shape == (B, C, H, W) and got.dtype == torch.float32
    assert rel_err(got, ref64) < 1e-5
    assert rel_err(got, plain) < 1e-5


def test_fused_eval_fp64_is_exact():
    block = make_block(24, 8, torch.float64)
    feats = torch.randn(2, 24, 5, 7, dtype=torch.float64)
    regions = torch.randn(2, 24, 3, 1, dtype=torch.float64)
    assert rel_err(run(block, feats, regions, True), run(block, feats, regions, False)) < 1e-12


def test_fused_eval_non_contiguous_inputs():
    block = make_block(32, 16)
    feats = torch.randn(2, 9, 11, 32).permute(0, 3, 1, 2)
    regions = torch.randn(2, 7, 32, 1).permute(0, 2, 1, 3)
    assert not feats.is_contiguous() and not regions.is_contiguous()
    expected = run(block, feats.contiguous(), regions.contiguous(), False)
    assert rel_err(run(block, feats, regions, True), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_eval_low_precision(dtype):
    """fp16/bf16 run in fp32 inside: error vs float64 at most 2x the reference's in that dtype."""
    block = make_block(32, 16)
    feats = torch.randn(1, 32, 6, 10)
    regions = torch.randn(1, 32, 4, 1)
    exact = run(block.double(), feats.double(), regions.double(), False)
    block.to(dtype)
    got = run(block, feats.to(dtype), regions.to(dtype), True)
    plain = run(block, feats.to(dtype), regions.to(dtype), False)
    assert got.dtype == dtype
    assert rel_err(got, exact) <= 2 * rel_err(plain, exact) + torch.finfo(dtype).eps


def test_fused_path_only_in_eval_without_grad(monkeypatch):
    block = make_block(16, 8)
    feats, regions = torch.randn(1, 16, 3, 4), torch.randn(1, 16, 2, 1)
    calls = []
    real = torch.ops.ocrkernels.object_attention_eval

    class Spy:
        def __call__(self, *args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(torch.ops.ocrkernels, "object_attention_eval", Spy())
    run(block, feats, regions, True)
    assert len(calls) == 1
    block(feats, regions)  # grad enabled: reference
    block.train()
    with torch.no_grad():
        block(feats, regions)  # training: reference
    assert len(calls) == 1


def test_a_cuda_backend_runs_the_fused_op_not_the_reference(monkeypatch):
    """Where ``auto`` resolves to the CUDA C++ kernels the block calls the fused op (dispatched
    by device), in the input's dtype as the CUDA kernel takes it. Checked on CPU tensors, with
    the resolution faked: the op then runs its CPU kernel."""
    block = make_block(16, 8)
    feats, regions = torch.randn(2, 16, 5, 3), torch.randn(2, 16, 4, 1)
    calls = []
    real = torch.ops.ocrkernels.object_attention_eval

    def spy(*args):
        calls.append([a.dtype for a in args])
        return real(*args)

    monkeypatch.setattr(torch.ops.ocrkernels, "object_attention_eval", spy)
    monkeypatch.setattr(ocrkernels.backends, "resolve_backend", lambda backend, device: "cuda")
    got = run(block, feats, regions, True)
    assert len(calls) == 1 and set(calls[0]) == {torch.float32}
    assert rel_err(got, run(block, feats, regions, False)) < 1e-5


def test_opcheck_object_attention_eval():
    block = make_block(16, 8)
    regions = torch.randn(2, 16, 3, 1)
    feats = torch.randn(2, 16, 5, 6)
    key = block.key_project(regions).flatten(2).detach()
    value = block.value_project(regions).flatten(2).detach()
    w_out, b_out = (t.detach() for t in fold_conv_bn(block.out_project, torch.float32))
    args = [feats, *(t.detach() for t in fold_conv_bn(block.query_project[0], torch.float32)),
            *(t.detach() for t in fold_conv_bn(block.query_project[1], torch.float32)),
            key.transpose(1, 2).contiguous(), (w_out @ value + b_out[:, None]).contiguous()]
    wb, bb = (t.detach() for t in fold_conv_bn(block.bottleneck, torch.float32))
    args += [wb[:, :16].contiguous(), wb[:, 16:].contiguous(), bb]
    torch.library.opcheck(torch.ops.ocrkernels.object_attention_eval.default, tuple(args))


def test_compiled_head_uses_the_same_numbers():
    head = ocrkernels.OCRHead(24, 5, channels=32, ocr_channels=16).eval()
    randomise_batchnorm(head)
    x, coarse = torch.randn(1, 24, 9, 10), torch.randn(1, 5, 9, 10)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, coarse), head(x, coarse), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["query_w1", "keys", "values", "out_b", "dtype"])
def test_raw_op_rejects_bad_arguments(bad):
    C, D, K, B = 8, 4, 3, 1
    args = dict(feats=torch.randn(B, C, 2, 3), query_w1=torch.randn(D, C),
                query_b1=torch.randn(D), query_w2=torch.randn(D, D), query_b2=torch.randn(D),
                keys=torch.randn(B, K, D), values=torch.randn(B, C, K),
                out_w_context=torch.randn(C, C), out_w_feats=torch.randn(C, C),
                out_b=torch.randn(C))
    if bad == "dtype":
        args["query_b2"] = args["query_b2"].double()
        match = "dtype of feats"
    else:
        args[bad] = args[bad][..., :-1]
        match = f"{bad} must have shape"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ocrkernels.object_attention_eval(*args.values())
