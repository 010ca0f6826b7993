"""ocrnet.utils.flops and ocrkernels.flops: FLOPs by FlopCounterMode, the same numbers as the
forward-hook counter
it replaced, and the same total for the fused inference path as for the reference."""

from __future__ import annotations

import pytest
import torch
from test_modules import randomise_batchnorm

import ocrkernels
import ocrnet
from ocrkernels.flops import object_attention_eval_flops, spatial_gather_flops
from ocrnet.configs import SYNTHETIC_CONFIGS, get_config
from ocrnet.evaluation.speed import count_flops
from ocrnet.models import build_segmentor
from ocrnet.utils.flops import count_model_flops



def flop_counter_mode():
    # torch.utils.flop_counter imports Triton: not at collection, before the Triton test
    # modules set TRITON_INTERPRET.
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


needs_ext = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                               reason="ocrkernels._C is not built")
lib = torch.ops.ocrkernels

# What `ocrnet bench` printed (count_flops with forward hooks on convs, linears, the spatial
# gather and the object attention) before the counting moved to FlopCounterMode, at each
# config's crop size, batch 1.
HOOK_COUNTS = {
    "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024": {
        "backbone": 33314668544, "aux_head": 5113774080, "ocr_head": 139296899072,
        "total": 177725341696},
    "ocrnet_hr48_4xb4-80k_ade20k-512x512": {
        "backbone": 169443065856, "aux_head": 20525875200, "ocr_head": 144281698304,
        "total": 334250639360},
    "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024": {
        "backbone": 713996369920, "aux_head": 38734397440, "ocr_head": 169068068864,
        "total": 921798836224},
}

# The same for the synthetic configs at small shapes, with batch 2 and an odd size too.
TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
LITE = "ocrnet_hrlite12_1xb8-600_synthetic-64x128"
HOOK_COUNTS_SMALL = {
    (TINY, (1, 3, 32, 64)): {"backbone": 17683456, "aux_head": 3901440, "ocr_head": 9889280,
                             "total": 31474176},
    (TINY, (2, 3, 40, 72)): {"backbone": 52262400, "aux_head": 10972800, "ocr_head": 27799040,
                             "total": 91034240},
    (LITE, (1, 3, 8, 8)): {"backbone": 1866016, "aux_head": 269280, "ocr_head": 2393088,
                           "total": 4528384},
}


@pytest.mark.parametrize("name", sorted(HOOK_COUNTS))
def test_published_configs_count_as_before(name):
    h, w = get_config(name).data.crop_size
    assert count_flops(name, (1, 3, h, w)) == HOOK_COUNTS[name]


def test_aux_head_by_hand():
    # HRNetV2p-W18-Small on 512x1024: the 1x1 FCN head (270 -> 270, then 270 -> 19 classes)
    # on the 1/4-resolution map, 128 x 256 pixels.
    counts = HOOK_COUNTS["ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"]
    assert counts["aux_head"] == 2 * 128 * 256 * (270 * 270 + 270 * 19)


@pytest.mark.parametrize("name, shape", sorted(HOOK_COUNTS_SMALL))
def test_synthetic_configs_count_as_before(name, shape):
    assert count_flops(SYNTHETIC_CONFIGS[name], shape) == HOOK_COUNTS_SMALL[(name, shape)]


@needs_ext
@pytest.mark.parametrize("name", [TINY, LITE])
@pytest.mark.parametrize("shape", [(1, 3, 32, 64), (2, 3, 40, 72), (1, 3, 8, 8)])
def test_fused_eval_counts_as_reference(name, shape):
    cfg = SYNTHETIC_CONFIGS[name]
    torch.manual_seed(0)
    model = randomise_batchnorm(build_segmentor(cfg, fused=False)).eval()
    fast = ocrnet.prepare_for_inference(model)
    x = torch.randn(shape)
    reference = count_model_flops(model, x)
    assert count_model_flops(fast, x) == reference
    assert reference == count_flops(cfg, shape)  # on real CPU tensors as on "meta"
    # The fused path really ran the custom ops, and their formulas were used.
    counter = flop_counter_mode()
    with counter, torch.no_grad():
        fast(x)
    ops = counter.get_flop_counts()["Global"]
    assert ops.get(lib.object_attention_eval, 0) > 0
    assert ops.get(lib.spatial_gather_forward, 0) + ops.get(lib.spatial_gather, 0) > 0
    # ... and the reference none of them.
    with counter, torch.no_grad():
        model(x)
    assert not [op for op in counter.get_flop_counts()["Global"]
                if str(op).startswith("ocrkernels.")]


def _count(fn, *args) -> dict:
    counter = flop_counter_mode()
    with counter:
        fn(*args)
    return counter.get_flop_counts().get("Global", {})


@needs_ext
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_op_formulas(device):
    B, C, D, K, H, W = 2, 12, 8, 5, 3, 7
    N = H * W

    def t(*shape):
        return torch.randn(shape, device=device)

    probs, feats = t(B, K, H, W), t(B, C, H, W)
    # spatial_gather's autograd wrapper may hand the work to spatial_gather_forward: one of
    # the two is counted, once.
    counted = _count(lib.spatial_gather, probs, feats, 1.0)
    assert set(counted) <= {lib.spatial_gather, lib.spatial_gather_forward}
    assert sum(counted.values()) == 2 * B * K * C * N
    assert spatial_gather_flops(probs.shape, feats.shape) == 2 * B * K * C * N
    _, lse = lib.spatial_gather_forward(probs, feats, 1.0)
    assert _count(lib.spatial_gather_forward, probs, feats, 1.0) == {
        lib.spatial_gather_forward: 2 * B * K * C * N}
    assert _count(lib.spatial_gather_backward, t(B, C, K, 1), probs, feats, lse, 1.0) == {
        lib.spatial_gather_backward: 4 * B * K * C * N}
    args = (t(B, C, H, W), t(D, C), t(D), t(D, D), t(D), t(B, K, D), t(B, C, K), t(C, C),
            t(C, C), t(C))
    # The reference block per pixel: query 1x1 convs C->D->D, similarities, context,
    # out_project D->C, bottleneck 2C->C; less the caller's up-projection of the K values.
    want = 2 * B * N * (C * D + D * D + K * D + K * D + D * C + 2 * C * C) - 2 * B * C * D * K
    assert _count(lib.object_attention_eval, *args) == {lib.object_attention_eval: want}
    assert object_attention_eval_flops(*(a.shape for a in args)) == want
    x, x2 = t(B, C, N), t(B, D, N)
    assert _count(lib.pixel_matmul, t(D, C), x) == {lib.pixel_matmul: 2 * B * D * N * C}
    assert _count(lib.pixel_matmul, t(D, C), x, t(D, D), x2) == {
        lib.pixel_matmul: 2 * B * D * N * (C + D)}
    out = torch.empty(B, D, N, device=device)
    assert _count(lib.pixel_matmul_into, t(D, C), x, None, None, out) == {
        lib.pixel_matmul_into: 2 * B * D * N * C}
    assert _count(lib.pixel_matmul_nt, x2, x) == {lib.pixel_matmul_nt: 2 * B * D * N * C}


def test_counts_outside_the_parts_are_an_error():
    with torch.device("meta"):
        model = build_segmentor(SYNTHETIC_CONFIGS[TINY], fused=False, init=False).eval()
    # A matmul after the heads, in the segmentor itself: in the total, in none of the parts.
    model.register_forward_hook(lambda mod, args, out: out.transpose(2, 3) @ out)
    with pytest.raises(RuntimeError, match="in the parts"):
        count_model_flops(model, torch.empty(1, 3, 32, 64, device="meta"))
