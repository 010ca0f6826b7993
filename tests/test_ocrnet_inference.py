"""The inference fast path (issue 4, item 6): BatchNorm folding, fused OCR head, channels_last
backbone, ``ocrnet.inference`` and the whole-model benchmark's smoke test."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED, rel_err, run_models_bench, shared_path
from test_modules import randomise_batchnorm
from torch import nn

import ocrkernels
import ocrnet
from ocrkernels.winograd import WinogradConv2d
from ocrnet.inference.fastpath import PointwiseConv, fold_batchnorm, is_prepared, normalise
from ocrnet.models import build_segmentor

HR18S = "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"
R101 = "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024"
FIXTURE = "mmseg_ocrnet_hr18s"
CKPT = "ocrnet_hr18s_cityscapes_randinit.pth"
TOL = 1e-4
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

needs_ext = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                               reason="ocrkernels._C is not built")


def _randomise_batchnorm(model: nn.Module) -> None:
    """BN statistics and affine parameters away from mmseg's 0 / 1 init, so folding matters."""
    with torch.no_grad():
        randomise_batchnorm(model, mean_scale=0.2, bias_scale=0.2)


def _small_model(name: str = HR18S) -> ocrnet.OCRNet:
    model = build_segmentor(name, fused=False).eval()
    _randomise_batchnorm(model)
    return model


def _bn_owners(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


# ------------------------------------------------------------------------------ the fast path

@pytest.mark.parametrize("name, size, channels_last", [
    (HR18S, (70, 90), False),  # odd branch sizes: exercises the fuse layers' final resize
    (HR18S, (70, 90), True),
    (R101, (41, 41), True),
])
def test_fast_path_matches_eager(name, size, channels_last, one_thread):
    model = _small_model(name)
    fast = ocrnet.prepare_for_inference(model, channels_last=channels_last)
    img = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref_aux, ref_ocr = model.decode(model.extract_features(img))
        aux, ocr = fast.decode(fast.extract_features(img))
        logits = fast(img)
    assert rel_err(aux, ref_aux) <= TOL
    assert rel_err(ocr, ref_ocr) <= TOL
    assert logits.shape == (1, 19, *size)
    # The maps the heads read come contiguous; ResNet-D8's first two stages, which no head
    # reads, stay channels_last (the same values).
    with torch.no_grad():
        feats, ref_feats = fast.extract_features(img), model.extract_features(img)
    read = (range(len(feats)) if fast.input_transform == "resize_concat"
            else {fast.aux_in_index % len(feats), fast.ocr_in_index % len(feats)})
    assert all(feats[i].is_contiguous() for i in read)
    if channels_last and name == R101:
        assert read == {2, 3}
        assert feats[0].is_contiguous(memory_format=torch.channels_last)
    for t, ref in zip(feats, ref_feats):
        assert rel_err(t, ref) <= TOL


def test_prepare_folds_everything_but_the_attention_block():
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_before = _bn_owners(model)
    fast = ocrnet.prepare_for_inference(model, channels_last=False)
    # Only the object-attention CBRs keep their BN (the fused kernel folds them itself).
    left = _bn_owners(fast)
    assert left and all(n.startswith("decode_head.1.object_context_block.") for n in left)
    assert len(left) == 7  # 2 query, 2 key, value, out_project, bottleneck
    # The bottleneck's conv-BN-ReLU: folded, then the Winograd convolution with its ReLU.
    assert isinstance(fast.ocr_head.bottleneck, WinogradConv2d) and fast.ocr_head.bottleneck.relu
    assert fast.ocr_head.bottleneck.bias is not None
    assert not fast.training and fast.fused and is_prepared(fast)
    assert not any(p.requires_grad for p in fast.parameters())
    # The original is untouched: same weights, same modules, still unfused.
    assert not model.fused and not is_prepared(model)
    assert _bn_owners(model) == bn_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Preparing a prepared model is a no-op; changing its memory format is refused.
    assert ocrnet.prepare_for_inference(fast) is fast
    with pytest.raises(ValueError, match="already prepared"):
        ocrnet.prepare_for_inference(fast, channels_last=True)
    cl = ocrnet.prepare_for_inference(model, channels_last=True)
    assert cl.backbone.inner.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_prepare_runs_the_heads_1x1_convolutions_as_pixel_matmuls():
    model = _small_model()
    fast = ocrnet.prepare_for_inference(model, channels_last=False)
    pointwise = [n for n, m in fast.named_modules() if isinstance(m, PointwiseConv)]
    # The HRNet auxiliary head's 1x1 ConvModule (with its ReLU) and classifier, the OCR
    # head's classifier.
    assert pointwise == ["decode_head.0.convs.0", "decode_head.0.conv_seg",
                         "decode_head.1.conv_seg"]
    assert [fast.get_submodule(n).relu for n in pointwise] == [True, False, False]
    assert isinstance(fast.ocr_head.object_context_block.query_project[0].conv, nn.Conv2d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_relu_is_the_convolution_and_relu(dtype, bias):
    conv = nn.Conv2d(37, 11, 1, bias=bias).to(dtype)
    x = torch.randn(2, 37, 9, 13, dtype=dtype)
    with torch.no_grad():
        want = torch.relu(conv(x))
        got = PointwiseConv(conv, relu=True)(x)
    assert (got == 0).any() and (got > 0).any()
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_conv_is_the_convolution(dtype):
    conv = nn.Conv2d(37, 11, 1).to(dtype)
    x = torch.randn(2, 37, 9, 13, dtype=dtype)
    with torch.no_grad():
        want = conv(x)
        got = PointwiseConv(conv)(x)
        got_cl = PointwiseConv(conv)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape == (2, 11, 9, 13)
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-14)
    assert rel_err(got_cl, want) <= (1e-6 if dtype == torch.float32 else 1e-14)
    if dtype == torch.float64:  # not a pixel_matmul dtype: the convolution itself
        assert torch.equal(got, want)


def test_prepare_argument_errors():
    with pytest.raises(TypeError, match="model must be an ocrnet OCRNet"):
        ocrnet.prepare_for_inference(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="channels_last"):
        ocrnet.prepare_for_inference(_small_model(), channels_last="yes")
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_segmentor(HR18S, init=False).train())


# ----------------------------------------------------------------- mmsegmentation fixture

@pytest.fixture(scope="module")
def fixture_fast_run():
    root = shared_path("fixtures", FIXTURE)
    info = json.loads((root / "fixture.json").read_text())
    model = ocrnet.init_model(HR18S, root / CKPT, fused=False)
    fast = ocrnet.prepare_for_inference(model)
    ref = {f.split("_1x")[0]: torch.from_numpy(np.load(root / f))
           for f in info["files"] if f.endswith(".npy") and (root / f).exists()}
    with torch.no_grad():
        feats = fast.extract_features(ref["input"])
        aux, ocr = fast.decode(feats)
    return ref, feats, aux, ocr


@needs_ext
def test_fixture_fast_path(fixture_fast_run):
    ref, feats, aux, ocr = fixture_fast_run
    errors = {f"backbone_feat{i}": rel_err(f, ref[f"backbone_feat{i}"])
              for i, f in enumerate(feats)}
    errors["aux_logits"] = rel_err(aux, ref["aux_logits"])
    errors["ocr_logits"] = rel_err(ocr, ref["ocr_logits"])
    print("fast path vs mmseg fixture, relative errors:",
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert aux.shape == ref["aux_logits"].shape and ocr.shape == ref["ocr_logits"].shape
    for key, err in errors.items():
        assert err <= TOL, f"{key}: {err:.2e}"


# ---------------------------------------------------------------------- ocrnet.inference

@pytest.fixture(scope="module")
def small_fast():
    torch.manual_seed(0)
    model = _small_model()
    return model, ocrnet.prepare_for_inference(model)


def _image(h: int = 48, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_inference_labels(small_fast, one_thread):
    model, fast = small_fast
    image = _image()
    labels = ocrnet.inference(fast, image)
    assert labels.shape == (48, 80) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 19
    # The normalisation, written out independently: (x - mean) / std per RGB channel.
    x = torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)[None])
    torch.testing.assert_close(normalise(image), x, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = fast(normalise(image))[0].argmax(0).numpy()
        eager = model(x)[0].argmax(0).numpy()
    np.testing.assert_array_equal(labels, expected)
    # Against the unprepared eager model: only near-ties may differ.
    assert (labels != eager).mean() <= 1e-3
    # An unprepared model is prepared for the call, with the same result.
    np.testing.assert_array_equal(ocrnet.inference(model, image), labels)


def test_inference_from_files(small_fast, tmp_path, one_thread):
    _, fast = small_fast
    image = _image(33, 47, seed=1)
    np.save(tmp_path / "img.npy", image)
    labels = ocrnet.inference(fast, tmp_path / "img.npy")
    np.testing.assert_array_equal(labels, ocrnet.inference(fast, image))
    cv2 = pytest.importorskip("cv2")
    # A lossless PNG, written BGR as OpenCV does: read back as RGB, the same labels.
    assert cv2.imwrite(str(tmp_path / "img.png"), image[:, :, ::-1].copy())
    np.testing.assert_array_equal(ocrnet.inference(fast, str(tmp_path / "img.png")), labels)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="cannot decode"):
        ocrnet.inference(fast, tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ocrnet.inference(fast, tmp_path / "missing.png")
    (tmp_path / "img.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown suffix"):
        ocrnet.inference(fast, tmp_path / "img.txt")


def test_inference_without_image_decoders(small_fast, tmp_path, monkeypatch):
    _, fast = small_fast
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    # None in sys.modules makes the import raise ImportError: neither OpenCV nor Pillow.
    monkeypatch.setitem(sys.modules, "ocrnet.data.io", None)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs OpenCV .* or Pillow"):
        ocrnet.inference(fast, tmp_path / "img.png")


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((8, 8), np.uint8), ValueError, r"shape \(H, W, 3\)"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, r"shape \(H, W, 3\)"),
    (np.zeros((3, 8, 8), np.uint8), ValueError, r"shape \(H, W, 3\)"),
    (np.zeros((8, 8, 3), np.float32), ValueError, "dtype uint8"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), TypeError, "numpy array"),
])
def test_inference_bad_images(small_fast, bad, error, match):
    _, fast = small_fast
    with pytest.raises(error, match=match):
        ocrnet.inference(fast, bad)


def test_inference_bad_model():
    with pytest.raises(TypeError, match="model must be an ocrnet OCRNet"):
        ocrnet.inference(nn.Identity(), _image())


# ----------------------------------------------------------------------------- benchmark

@needs_ext
def test_models_bench_smoke(tmp_path):
    proc, rows = run_models_bench(tmp_path, "--images", "2", "--peers", "none", timeout=120)
    assert "| model | path | fps | median s | vs eager |" in proc.stdout
    assert [(r["model"], r["path"]) for r in rows] == [("hr18s", "eager"), ("hr18s", "fast")]
    for r in rows:
        assert r["shape"] == [1, 3, 256, 512] and r["images"] == 2 and r["warmup"] == 0
        assert r["fps"] == pytest.approx(2 / r["seconds"]) and r["median_s"] > 0
        assert r["gflops"] == pytest.approx(r["gflop"] * r["fps"])
        # 177.7 GFLOP at 512x1024 (the design's 178); a quarter of the pixels here.
        assert 177.7 / 4 * 0.99 <= r["gflop"] <= 177.7 / 4 * 1.01
        assert r["params_m"] == pytest.approx(6.378496)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(rows[1]["fps"] / rows[0]["fps"])
    assert rows[1]["rel_err_vs_eager"] <= TOL
    # hr18s runs the mmsegmentation fixture's weights where ../shared has them (always in CI).
    fixture = (SHARED / "fixtures" / "mmseg_ocrnet_hr18s" /
               "ocrnet_hr18s_cityscapes_randinit.pth").is_file()
    expected = "mmsegmentation fixture" if fixture else "mmseg random init"
    assert all(r["weights"].startswith(expected) for r in rows), rows[0]["weights"]
    assert f"weights and image: hr18s: {expected}" in proc.stdout
