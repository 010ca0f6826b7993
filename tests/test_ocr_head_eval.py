"""``ocrkernels::ocr_head_eval``, the whole eval-mode OCR head on folded parameters: equal to
the unfused OCRHead (mmsegmentation's semantics) over a grid of shapes and dtypes, on the fused
CPU kernels and on the reference, with the op's checks, compile and export."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import ocrkernels
from ocrkernels import OCRHead, backends
from ocrkernels.head_eval import (PARAMETER_NAMES, head_parameters, ocr_head_eval,
                                  ocr_head_reference)
from ocrkernels.onnx_ops import CustomOpHead, with_custom_op_heads
from test_modules import randomise_batchnorm

FUSED = backends.CPU_WINOGRAD_KERNEL and "cpu" in backends.available_backends("cpu")


def _head(cin=24, k=5, c=32, d=16, scale=1.0, dtype=torch.float32, seed=0) -> OCRHead:
    torch.manual_seed(seed)
    head = OCRHead(cin, k, channels=c, ocr_channels=d, scale=scale, fused=False)
    return randomise_batchnorm(head, mean_scale=0.2, bias_scale=0.2).eval().to(dtype)


def _inputs(b, cin, k, h, w, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cin, h, w, generator=g).to(dtype),
            (3 * torch.randn(b, k, h, w, generator=g)).to(dtype))


@pytest.mark.parametrize("b,k,h,w", [(1, 5, 8, 8), (2, 5, 13, 17), (3, 1, 7, 9),
                                     (1, 19, 21, 11)])
def test_matches_the_unfused_head(b, k, h, w):
    head = _head(k=k, scale=1.5)
    feats, coarse = _inputs(b, 24, k, h, w)
    with torch.no_grad():
        want = head(feats, coarse)
    params = head_parameters(head)
    assert len(params) == len(PARAMETER_NAMES)
    got = ocr_head_eval(feats, coarse, *params, scale=1.5)
    ref = ocr_head_reference(feats, coarse, *params, scale=1.5)
    assert got.shape == (b, k, h, w)
    assert rel_err(ref, want) <= 1e-5
    # The Winograd bottleneck carries ~1e-5 relative rounding (tests/test_winograd.py).
    assert rel_err(got, want) <= 1e-4


def test_float64_is_exact_and_layouts_do_not_matter():
    head = _head(dtype=torch.float64)
    feats, coarse = _inputs(2, 24, 5, 11, 9, torch.float64)
    with torch.no_grad():
        want = head(feats, coarse)
    params = head_parameters(head)
    got = ocr_head_eval(feats, coarse, *params)
    assert got.dtype == torch.float64 and rel_err(got, want) <= 1e-12
    # channels_last and non-contiguous inputs and parameters give the same numbers.
    cl = ocr_head_eval(feats.to(memory_format=torch.channels_last),
                       coarse.to(memory_format=torch.channels_last), *params)
    wide = torch.stack([feats, feats], -1)[..., 0]
    assert not wide.is_contiguous() and torch.equal(wide, feats)
    strided = ocr_head_eval(wide, coarse, *[p.t().contiguous().t() if p.dim() == 2 else p
                                            for p in params])
    assert rel_err(cl, got) <= 1e-13 and rel_err(strided, got) <= 1e-13


@pytest.mark.skipif(not FUSED, reason="the compiled CPU kernels are not built")
def test_fused_path_runs_the_kernels_and_the_reference_is_forced_by_env(monkeypatch):
    head = _head()
    feats, coarse = _inputs(1, 24, 5, 12, 12)
    params = head_parameters(head)
    fused = ocr_head_eval(feats, coarse, *params)
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    ref = ocr_head_eval(feats, coarse, *params)
    assert torch.equal(ref, ocr_head_reference(feats, coarse, *params))
    # Different rounding (Winograd, fused order): the paths really differ, and agree.
    assert not torch.equal(fused, ref) and rel_err(fused, ref) <= 1e-4


def test_non_finite_values_land_where_the_reference_puts_them():
    head = _head()
    feats, coarse = _inputs(1, 24, 5, 9, 10)
    feats[0, 3, 4, 5] = float("nan")
    coarse[0, 1, 2, 2] = float("inf")
    params = head_parameters(head)
    got = ocr_head_eval(feats, coarse, *params)
    want = ocr_head_reference(feats, coarse, *params)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    if finite.any():
        assert rel_err(got[finite], want[finite]) <= 1e-4


def test_bad_input_names_the_argument():
    head = _head()
    feats, coarse = _inputs(1, 24, 5, 8, 8)
    params = head_parameters(head)
    with pytest.raises(ValueError, match="expected 18 parameter tensors"):
        ocr_head_eval(feats, coarse, *params[:-1])
    with pytest.raises(ValueError, match=r"bottleneck_w must have shape \(C, 23, 3, 3\)"):
        ocr_head_eval(feats[:, :23], coarse, *params)
    bad = list(params)
    bad[PARAMETER_NAMES.index("cat_w")] = bad[PARAMETER_NAMES.index("cat_w")][:, :40]
    with pytest.raises(ValueError, match=r"cat_w must have shape \(32, 64\)"):
        ocr_head_eval(feats, coarse, *bad)
    with pytest.raises(ValueError, match=r"coarse_logits must have shape \(B, K, H, W\) = "
                                         r"\(1, 5, 8, 8\)"):
        ocr_head_eval(feats, coarse[:, :4], *params)
    with pytest.raises(ValueError, match="query_b1 must be torch.float32"):
        bad = list(params)
        bad[3] = bad[3].double()
        ocr_head_eval(feats, coarse, *bad)
    with pytest.raises(ValueError, match="eval mode"):
        head_parameters(head.train())


def test_opcheck_compile_and_export():
    head = CustomOpHead(_head())
    feats, coarse = _inputs(2, 24, 5, 9, 7)
    args = (feats, coarse, *(getattr(head, n) for n in PARAMETER_NAMES), 1.0)
    torch.library.opcheck(torch.ops.ocrkernels.ocr_head_eval.default, args)
    want = head(feats, coarse)
    compiled = torch.compile(head, fullgraph=True, dynamic=False)
    assert rel_err(compiled(feats, coarse), want) <= 1e-6
    program = torch.export.export(head, (feats, coarse))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "ocrkernels.ocr_head_eval.default" in targets
    assert rel_err(program.module()(feats, coarse), want) <= 1e-6


def test_custom_op_heads_replace_every_ocr_head_and_leave_the_model():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _head(seed=0), _head(seed=1)

        def forward(self, feats, coarse):
            return self.a(feats, coarse) + self.b(feats, coarse)

    model = Two().eval()
    feats, coarse = _inputs(1, 24, 5, 10, 10)
    with torch.no_grad():
        want = model(feats, coarse)
    custom = with_custom_op_heads(model)
    assert isinstance(custom.a, CustomOpHead) and isinstance(custom.b, CustomOpHead)
    assert isinstance(model.a, OCRHead)  # the original is untouched
    assert custom.a.num_classes == 5 and custom.a.in_channels == 24
    assert rel_err(custom(feats, coarse), want) <= 1e-4
    assert isinstance(with_custom_op_heads(_head()), CustomOpHead)
    with pytest.raises(ValueError, match="holds no ocrkernels.OCRHead"):
        with_custom_op_heads(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        with_custom_op_heads("model")


def test_published_head_shapes_from_a_prepared_ocrnet():
    """The folded parameters of an ``ocrnet`` prepared head (Winograd bottleneck, pointwise
    classifier) are those of the unprepared head."""
    import ocrnet
    from ocrnet.configs import SYNTHETIC_CONFIGS
    from ocrnet.models import build_segmentor

    torch.manual_seed(0)
    model = randomise_batchnorm(build_segmentor(
        SYNTHETIC_CONFIGS["ocrnet_hrtiny8_1xb4-20_synthetic-32x64"], fused=True)).eval()
    fast = ocrnet.prepare_for_inference(model, channels_last=False, keep_memory=False)
    for mine, theirs in zip(head_parameters(fast.ocr_head), head_parameters(model.ocr_head)):
        assert mine.shape == theirs.shape and rel_err(mine, theirs) <= 1e-6
    assert ocrkernels.ocr_head_eval is ocr_head_eval


@pytest.mark.skipif(not FUSED, reason="the compiled CPU kernels are not built")
def test_winograd_weights_are_reused_only_for_equal_weights():
    from ocrkernels import head_eval
    from ocrkernels.winograd import transform_weight

    head = _head(seed=3)
    feats, coarse = _inputs(1, 24, 5, 8, 8)
    params = head_parameters(head)
    first = ocr_head_eval(feats, coarse, *params)
    u = head_eval._winograd_weight(params[0].clone())  # a copy: found by value
    assert torch.equal(u, transform_weight(params[0]))
    assert head_eval._winograd_weight(params[0].clone()) is u
    changed = [p.clone() for p in params]
    changed[0][0, 0, 1, 1] += 1.0  # a changed weight gets its own transform
    assert not torch.equal(head_eval._winograd_weight(changed[0]), u)
    want = ocr_head_reference(feats, coarse, *changed)
    assert rel_err(ocr_head_eval(feats, coarse, *changed), want) <= 1e-4
    assert torch.equal(ocr_head_eval(feats, coarse, *params), first)
