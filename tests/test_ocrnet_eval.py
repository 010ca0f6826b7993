"""Evaluation, inference modes and speed reporting (issue 6): the IoU metric against
hand-computed values, sliding-window and multi-scale + flip inference on models whose output
is known, ``ocrnet test`` (one process and torchrun), ``ocrnet infer``'s PNGs, ``ocrnet
bench`` and one-line errors for bad input.

Models are the tiny synthetic config (HRNet w8_tiny, 32x64 images) or small hand-written
modules; everything runs on the CPU with one thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, rel_err
from test_modules import randomise_batchnorm
from torch import nn

import ocrnet
from ocrnet.evaluation.speed import bench_config, count_flops, time_forwards
from ocrnet.cli import main as cli_main
from ocrnet.commands.test import run_test
from ocrnet.configs import SYNTHETIC_CONFIGS
from ocrnet.data import SyntheticDataset, build_collate, build_pipeline
from ocrnet.data import reduce_zero_label as reduce_zero_label_map
from ocrnet.data.palettes import colourise, overlay, palette_for
from ocrnet.evaluation import IoUMetric, format_table, json_ready
from ocrnet.evaluation.evaluate import evaluate
from ocrnet.inference import predict_batch, predict_logits, slide_logits
from ocrnet.inference.tta import multiscale_flip, tta_sizes
from ocrnet.models import build_segmentor
from ocrnet.models.checkpoint import save_checkpoint
from ocrnet.models.segmentor import count_parameters

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
LITE = "ocrnet_hrlite12_1xb8-600_synthetic-64x128"
CFG = SYNTHETIC_CONFIGS[TINY]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# Tiny models: one thread (two only add OpenMP barrier waits on these sizes).
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """BN statistics away from the 0 / 1 init, so that predictions are not constant."""
    with torch.no_grad():
        return randomise_batchnorm(model, mean_scale=0.2, bias_scale=0.5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomise_batchnorm(build_segmentor(CFG, fused=False)).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(tiny, path, {"config": TINY})
    return path


# ============================================================================== the metric

def test_metric_hand_computed_with_ignored_pixels():
    # 3 classes; class 2 is predicted only on ignored pixels, so it is absent from both.
    label = np.array([[0, 0, 0, 255], [1, 1, 0, 255]])
    pred = np.array([[0, 1, 1, 2], [1, 0, 0, 2]])
    m = IoUMetric(3, class_names=["a", "b", "c"])
    m.update(pred, label)
    r = m.compute()
    # Labelled (label, pred) pairs: (0,0) (0,1) (0,1) (1,1) (1,0) (0,0).
    # a: intersect 2, label 4, pred 3 -> IoU 2/5, Acc 2/4; b: 1, 2, 3 -> IoU 1/4, Acc 1/2.
    assert r["IoU"]["a"] == pytest.approx(40.0) and r["Acc"]["a"] == pytest.approx(50.0)
    assert r["IoU"]["b"] == pytest.approx(25.0) and r["Acc"]["b"] == pytest.approx(50.0)
    assert math.isnan(r["IoU"]["c"]) and math.isnan(r["Acc"]["c"])
    assert r["mIoU"] == pytest.approx(32.5)  # nan-mean of 40 and 25
    assert r["mAcc"] == pytest.approx(50.0)
    assert r["aAcc"] == pytest.approx(50.0)  # 3 of 6 labelled pixels
    assert r["pixels"] == 6
    # The fractions the trainer logs are the same numbers / 100.
    assert r["miou"] == pytest.approx(0.325) and r["per_class_iou"]["b"] == pytest.approx(0.25)
    assert m.hist.tolist() == [[2, 2, 0], [1, 1, 0], [0, 0, 0]]


def test_metric_predicted_but_never_labelled_counts_zero():
    m = IoUMetric(2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    r = m.compute()
    # Class 1: IoU 0 / (1 + 0 - 0) = 0 (enters the mean), Acc 0/0 = nan (does not).
    assert r["IoU"] == {"0": pytest.approx(50.0), "1": 0.0}
    assert math.isnan(r["Acc"]["1"])
    assert r["mIoU"] == pytest.approx(25.0) and r["mAcc"] == pytest.approx(50.0)
    assert r["aAcc"] == pytest.approx(50.0)


def test_metric_reduce_zero_label():
    raw = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)  # -> [[255, 0, 1], [2, 255, 0]]
    pred = np.array([[2, 0, 1], [1, 0, 0]])
    m = IoUMetric(3, reduce_zero_label=True)
    m.update(pred, raw)
    r = m.compute()
    # Pairs (0,0) (1,1) (2,1) (0,0): class 0 IoU 2/2, class 1 1/(1+2-1), class 2 0/(1+0-0).
    assert [r["IoU"][k] for k in "012"] == [pytest.approx(100.0), pytest.approx(50.0), 0.0]
    assert [r["Acc"][k] for k in "012"] == [pytest.approx(100.0), pytest.approx(100.0), 0.0]
    assert r["aAcc"] == pytest.approx(75.0) and r["mIoU"] == pytest.approx(50.0)
    # The same as the dataset-side mapping followed by a plain metric; the input is untouched.
    plain = IoUMetric(3)
    plain.update(pred, reduce_zero_label_map(raw))
    assert torch.equal(plain.hist, m.hist)
    assert raw[0, 0] == 0
    # Raw 4 becomes 3, outside 3 classes.
    with pytest.raises(ValueError, match=r"label values \[3\] outside \[0, 3\).*after "
                                         r"reduce_zero_label"):
        m.update(np.array([1]), np.array([4]))


def _brute_force(preds, labels, k: int, ignore: int = 255) -> dict[str, float]:
    """The definitions written out with boolean masks over all pixels at once."""
    p = np.concatenate([np.asarray(x).ravel() for x in preds])
    lab = np.concatenate([np.asarray(x).ravel() for x in labels])
    ok = lab != ignore
    p, lab = p[ok], lab[ok]
    iou, acc = [], []
    for c in range(k):
        inter = np.sum((p == c) & (lab == c))
        union = np.sum((p == c) | (lab == c))
        iou.append(inter / union if union else np.nan)
        acc.append(inter / np.sum(lab == c) if np.sum(lab == c) else np.nan)
    return {"mIoU": 100 * np.nanmean(iou), "mAcc": 100 * np.nanmean(acc),
            "aAcc": 100 * np.mean(p == lab), "IoU": [100 * v for v in iou]}


def test_metric_accumulates_images_of_different_sizes_and_processes():
    rng = np.random.default_rng(0)
    k = 5
    sizes = [(5, 7), (11, 3), (1, 1), (8, 8), (2, 3, 4), (13, 17)]
    preds, labels = [], []
    whole, part_a, part_b = IoUMetric(k), IoUMetric(k), IoUMetric(k)
    for i, size in enumerate(sizes):
        lab = rng.integers(0, k - 1, size)  # the last class is never labelled
        lab[rng.random(size) < 0.25] = 255
        pred = rng.integers(0, k, size)
        # numpy and torch, int32 and int64 alike.
        a, b = (torch.from_numpy(pred), lab.astype(np.int32)) if i % 2 else (pred, lab)
        whole.update(a, b)
        (part_a if i < 3 else part_b).update(a, b)
        preds.append(pred)
        labels.append(lab)
    r = whole.compute()
    ref = _brute_force(preds, labels, k)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert r[key] == pytest.approx(ref[key], rel=1e-12)
    assert list(r["IoU"].values()) == pytest.approx(ref["IoU"], rel=1e-12)
    assert math.isnan(r["Acc"]["4"])
    # Summing histograms (what all_reduce does across processes) gives the same metric.
    part_a.merge(part_b)
    assert torch.equal(part_a.hist, whole.hist)
    assert part_a.compute()["mIoU"] == r["mIoU"]
    whole.all_reduce()  # no process group: a no-op
    assert torch.equal(part_a.hist, whole.hist)


def test_metric_bad_input():
    m = IoUMetric(3)
    with pytest.raises(ValueError, match=r"pred has shape \(2, 2\), label \(2, 3\)"):
        m.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(TypeError, match="integer class ids.*argmax"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"label values \[7\] outside \[0, 3\)"):
        m.update(np.zeros(2, int), np.array([7, 255]))
    with pytest.raises(ValueError, match=r"pred values \[-1\] outside"):
        m.update(np.array([-1, 0]), np.array([0, 0]))
    assert m.hist.sum() == 0  # nothing counted by the refused updates
    with pytest.raises(ValueError, match="class_names has 2 names"):
        IoUMetric(3, class_names=["a", "b"])


def test_format_table_and_json():
    m = IoUMetric(3, class_names=["road", "sky", "car"])
    m.update(np.array([[0, 1, 1, 2], [1, 0, 0, 2]]), np.array([[0, 0, 0, 255], [1, 1, 0, 255]]))
    r = m.compute()
    lines = format_table(r).splitlines()
    assert lines[0].split() == ["|", "class", "|", "IoU", "|", "Acc", "|"]
    assert lines[2].split() == ["|", "road", "|", "40.00", "|", "50.00", "|"]
    assert lines[4].split() == ["|", "car", "|", "nan", "|", "nan", "|"]
    assert lines[-1] == "aAcc 50.00  mIoU 32.50  mAcc 50.00"
    doc = json.loads(json.dumps(json_ready(r)))  # strict JSON: nan -> null
    assert doc["IoU"]["car"] is None and doc["IoU"]["sky"] == pytest.approx(25.0)


# ==================================================================== inference modes

class PositionModel(nn.Module):
    """Logits of a window (B, 3, h, w): channel 0 = the column index inside the window,
    channel 1 = the row index; counts its calls and the window sizes it saw."""

    num_classes = 2
    align_corners = False

    def __init__(self):
        super().__init__()
        self.windows: list[tuple[int, int]] = []

    def forward(self, x):
        b, _, h, w = x.shape
        self.windows.append((h, w))
        cols = torch.arange(w, dtype=torch.float32).expand(b, h, w)
        rows = torch.arange(h, dtype=torch.float32)[:, None].expand(b, h, w)
        return torch.stack([cols, rows], 1)


def test_slide_window_covering_the_image_equals_whole(tiny):
    img = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        whole = tiny(img)
        for crop, stride in (((32, 48), (16, 16)), ((64, 64), (8, 8))):
            out = slide_logits(tiny, img, crop, stride, CFG.model.num_classes)
            assert torch.equal(out, whole)


def test_slide_overlap_averages_known_outputs():
    model = PositionModel()
    out = slide_logits(model, torch.zeros(1, 3, 7, 11), (4, 6), (3, 4), 2)
    # Rows: windows [0, 4) and [3, 7) (the last one moved back to end at the border); row 3
    # is in both, at local rows 3 and 0. Columns: [0, 6), [4, 10), [5, 11) (moved back).
    # Column 5: local 5, 1, 0 -> 2; columns 6-9: local (2, 1) ... (5, 4) -> 1.5 ... 4.5.
    assert model.windows == [(4, 6)] * 6
    expected_cols = [0, 1, 2, 3, 2, 2, 1.5, 2.5, 3.5, 4.5, 5]
    expected_rows = [0, 1, 2, 1.5, 1, 2, 3]
    assert out[0, 0].tolist() == [expected_cols] * 7
    assert out[0, 1].tolist() == [[r] * 11 for r in expected_rows]
    # predict_logits in slide mode is the same, then resized to out_size.
    from ocrnet.inference.predict import slide_test_config
    cfg = slide_test_config(CFG, (4, 6), (3, 4))
    assert cfg.mode == "slide" and cfg.crop_size == (4, 6) and cfg.stride == (3, 4)
    assert torch.equal(predict_logits(model, torch.zeros(1, 3, 7, 11), cfg), out)
    assert predict_logits(model, torch.zeros(1, 3, 7, 11), cfg, (14, 22)).shape == (1, 2, 14,
                                                                                   22)
    # The default window is the training crop and the stride 2/3 of it, rounded.
    assert slide_test_config(ocrnet.get_config(
        "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024")).stride == (341, 683)


def test_predict_batch_of_different_sizes(tiny):
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 32, 48, generator=g), torch.randn(3, 24, 40, generator=g),
              torch.randn(3, 32, 48, generator=g)]
    calls = []
    handle = tiny.register_forward_pre_hook(lambda m, inp: calls.append(tuple(inp[0].shape)))
    try:
        with torch.no_grad():
            out = predict_batch(tiny, images, out_sizes=[(32, 48), (50, 60), (16, 24)])
    finally:
        handle.remove()
    # One forward per size, the two 32x48 images together.
    assert sorted(calls) == [(1, 3, 24, 40), (2, 3, 32, 48)]
    assert [tuple(o.shape) for o in out] == [(7, 32, 48), (7, 50, 60), (7, 16, 24)]
    with torch.no_grad():
        for im, o in zip(images, out):
            single = predict_logits(tiny, im[None], None, tuple(o.shape[-2:]))[0]
            # Batch 2 and batch 1 convolutions round differently, nothing more.
            assert rel_err(o, single) <= 1e-5


class SymmetricConv(nn.Module):
    """A 3x3 conv whose kernels are mirror-symmetric left-right: flip-equivariant."""

    num_classes = 4
    align_corners = False

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(self.conv.weight + self.conv.weight.flip(-1))

    def forward(self, x):
        return self.conv(x)


def _bgr(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalised(img_bgr: np.ndarray) -> torch.Tensor:
    return build_collate(CFG, "test")([(img_bgr, None, {})])[0]


def test_flip_tta_of_flip_equivariant_model_is_the_plain_output():
    torch.manual_seed(0)
    model = SymmetricConv().eval()
    img = _bgr(20, 30)
    probs = multiscale_flip(model, img, CFG, ratios=(1.0,), flip=True)
    with torch.no_grad():
        plain = model(_normalised(img)).softmax(1)
        # Equivariance holds for this model (flip in, flip out), so TTA changes nothing.
        torch.testing.assert_close(model(_normalised(img).flip(-1)).flip(-1).softmax(1),
                                   plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs, plain, rtol=0, atol=1e-6)


def test_flip_tta_flips_back_before_averaging():
    model = PositionModel()
    probs = multiscale_flip(model, _bgr(3, 5), CFG, ratios=(1.0,), flip=True)
    x = torch.arange(5, dtype=torch.float64)
    # Unflipped pass: logit x - row; flipped pass, flipped back: (4 - x) - row. Mean of the
    # two softmaxes over (column, row) logits.
    for row in range(3):
        p0 = (torch.sigmoid(x - row) + torch.sigmoid((4 - x) - row)) / 2
        assert probs[0, 0, row].double().tolist() == pytest.approx(p0.tolist(), abs=1e-6)


class HeightModel(nn.Module):
    """Class 0's logit is the input height / 16 everywhere, class 1's is 0."""

    num_classes = 2
    align_corners = False

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        b, _, h, w = x.shape
        self.sizes.append((h, w))
        return torch.stack([torch.full((b, h, w), h / 16), torch.zeros(b, h, w)], 1)


def test_multiscale_averages_softmax_over_scales_and_flips():
    model = HeightModel()
    probs = multiscale_flip(model, _bgr(32, 48), CFG, ratios=(0.5, 1.0, 1.5), flip=True)
    # Scales 16x24, 32x48, 48x72, each with and without flip; the output at the image size.
    assert model.sizes == [(16, 24)] * 2 + [(32, 48)] * 2 + [(48, 72)] * 2
    assert probs.shape == (1, 2, 32, 48)
    sig = [1 / (1 + math.exp(-v)) for v in (1.0, 2.0, 3.0)]
    # The mean of the probabilities, not the probability of the mean logit (sigmoid(2)).
    assert probs[0, 0].unique().tolist() == pytest.approx([sum(sig) / 3], abs=1e-6)
    assert abs(sum(sig) / 3 - 1 / (1 + math.exp(-2.0))) > 1e-2
    out = multiscale_flip(HeightModel(), _bgr(32, 48), CFG, ratios=(1.0,), flip=False,
                          out_size=(10, 12))
    assert out.shape == (1, 2, 10, 12)


def test_tta_sizes():
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert tta_sizes((64, 128), ratios) == [(32, 64), (48, 96), (64, 128), (80, 160),
                                            (96, 192), (112, 224)]
    # 375x500 at 0.75: box (int(375.5), int(281.75)) = (375, 281); keep-ratio factor
    # min(375/500, 281/375) = 0.74933 -> h int(281.5) = 281, w int(375.17) = 375.
    assert tta_sizes((375, 500), (0.75,)) == [(281, 375)]
    # mmseg 0.x: ratios of the test scale (2048, 512): factor min(2048/500, 512/375).
    assert tta_sizes((375, 500), (1.0, 0.5), scale=(2048, 512)) == [(512, 683), (256, 341)]
    assert tta_sizes((1024, 2048), (0.5,), scale=(2048, 1024)) == tta_sizes((1024, 2048),
                                                                            (0.5,))
    with pytest.raises(ValueError, match="ratios must be > 0"):
        tta_sizes((10, 10), (0.0,))


def test_evaluate_modes_agree_where_they_must(tiny):
    ds = SyntheticDataset("val", length=3, height=32, width=64, seed=0)
    whole = evaluate(tiny, ds, CFG)
    from ocrnet.inference.predict import slide_test_config
    covering = evaluate(tiny, ds, CFG, test_cfg=slide_test_config(CFG, (32, 64), (16, 16)))
    assert covering["IoU"] == whole["IoU"] and covering["aAcc"] == whole["aAcc"]
    saved = {}
    tta = evaluate(tiny, ds, CFG, tta=True,
                   on_prediction=lambda i, pred, meta: saved.setdefault(i, pred))
    assert sorted(saved) == [0, 1, 2] and saved[0].shape == (32, 64)
    # The metric of the saved predictions, recomputed independently.
    ref = _brute_force([saved[i] for i in range(3)], [ds[i][1] for i in range(3)], 7)
    assert tta["mIoU"] == pytest.approx(ref["mIoU"]) and tta["aAcc"] == pytest.approx(ref["aAcc"])
    assert whole["images"] == 3 and whole["miou"] == pytest.approx(whole["mIoU"] / 100)


# =================================================================== ocrnet test (CLI)

def test_cli_test_writes_metrics_and_masks(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["test", TINY, str(tiny_ckpt), "--limit", "4", "--out", str(out),
                     "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "| background |" in captured.out and "mIoU" in captured.out
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 4 and report["mode"] == "whole" and report["fused"] is True
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks == [f"{i:06d}.png" for i in range(4)]
    # The masks are the predictions: scoring them against the labels gives the JSON's numbers.
    ds = SyntheticDataset("val", length=4, height=32, width=64, seed=0)
    preds = [cv2.imread(str(out / "masks" / m), cv2.IMREAD_UNCHANGED) for m in masks]
    assert all(p.shape == (32, 64) and p.dtype == np.uint8 for p in preds)
    ref = _brute_force(preds, [ds[i][1] for i in range(4)], 7)
    assert report["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-9)
    assert report["aAcc"] == pytest.approx(ref["aAcc"], rel=1e-9)
    iou = [np.nan if v is None else v for v in report["IoU"].values()]
    np.testing.assert_allclose(iou, ref["IoU"], rtol=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_test_under_torchrun_equals_one_process(tiny_ckpt, tmp_path):
    """Two processes, three images each: the summed histograms give the one-process metrics."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ocrnet", "test",
           TINY, str(tiny_ckpt), "--limit", "6", "--device", "cpu", "--out",
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one = run_test(TINY, tiny_ckpt, limit=6, device="cpu", json_path=tmp_path / "one.json",
                   progress=False)
    assert ddp["processes"] == 2 and ddp["images"] == 6
    assert len(list((tmp_path / "ddp" / "masks").iterdir())) == 6  # both ranks wrote theirs
    assert ddp["pixels"] == one["pixels"] == 6 * 32 * 64
    assert ddp["aAcc"] == one["aAcc"] and ddp["mIoU"] == one["mIoU"]
    assert ddp["IoU"] == json_ready(one["IoU"])


# ================================================================== ocrnet infer (CLI)

def test_cli_infer_writes_palette_pngs(tiny, tiny_ckpt, tmp_path, capsys):
    image = _bgr(40, 90, seed=5)
    assert cv2.imwrite(str(tmp_path / "street.png"), image)
    out = tmp_path / "pred"
    assert cli_main(["infer", str(tiny_ckpt), str(tmp_path / "street.png"), "--out", str(out),
                     "--device", "cpu", "--no-fused"]) == 0
    assert "street.png: 90x40" in capsys.readouterr().out
    mask = cv2.imread(str(out / "street_mask.png"), cv2.IMREAD_UNCHANGED)
    over = cv2.imread(str(out / "street_overlay.png"), cv2.IMREAD_UNCHANGED)
    # The image's own size (not the 32x64 the model ran at), 3 channels.
    assert mask.shape == (40, 90, 3) and over.shape == (40, 90, 3)
    palette = np.asarray(SyntheticDataset.palette, np.uint8)  # RGB
    rgb = mask[:, :, ::-1]
    ids = np.full((40, 90), -1)
    for k, colour in enumerate(palette):
        ids[(rgb == colour).all(-1)] = k
    assert (ids >= 0).all(), "a pixel whose colour is not in the synthetic palette"
    # The colours are the prediction of the test pipeline: resize to 32x64, logits back.
    img, _, meta = build_pipeline(CFG, "test")(image, None, {}, None)
    with torch.no_grad():
        logits = predict_logits(tiny, _normalised(img), None, (40, 90))
    np.testing.assert_array_equal(ids, logits.argmax(1)[0].numpy())
    expected = np.rint(0.5 * image[:, :, ::-1].astype(np.float32)
                       + 0.5 * palette[ids].astype(np.float32))
    np.testing.assert_array_equal(over[:, :, ::-1], expected.astype(np.uint8))


def test_palettes_are_the_published_colours():
    city = palette_for(ocrnet.get_config("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"))
    assert city.shape == (19, 3)
    assert city[0].tolist() == [128, 64, 128] and city[13].tolist() == [0, 0, 142]  # road, car
    voc = palette_for(ocrnet.get_config("ocrnet_hr18s_4xb4-20k_voc12aug-512x512"))
    assert voc.shape == (21, 3) and voc[1].tolist() == [128, 0, 0] and voc[15].tolist() == \
        [192, 128, 128]  # aeroplane, person
    ade = palette_for(ocrnet.get_config("ocrnet_hr18s_4xb4-80k_ade20k-512x512"))
    assert ade.shape == (150, 3) and ade[0].tolist() == [120, 120, 120]  # wall
    assert palette_for("synthetic", 9).shape == (9, 3)  # no 9-colour palette: generated
    col = colourise(np.array([[0, 1], [255, 2]]), voc)
    assert col.tolist() == [[[0, 0, 0], [128, 0, 0]], [[255, 255, 255], [0, 128, 0]]]
    assert overlay(np.full((1, 1, 3), 100, np.uint8), np.full((1, 1, 3), 201, np.uint8),
                   0.25).tolist() == [[[125, 125, 125]]]  # 75 + 50.25


# ======================================================================= one-line errors

def _error_line(capsys) -> str:
    """The one error line on stderr (progress counts, written with \\r, may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("ocrnet ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_missing_dataset_folder(tiny_ckpt, tmp_path, capsys):
    assert cli_main(["test", TINY, str(tiny_ckpt), "--data-root",
                     str(tmp_path / "nowhere")]) == 1
    line = _error_line(capsys)
    assert line.startswith("ocrnet test: error: ")
    assert "image directory not found" in line and str(tmp_path / "nowhere") in line


def test_cli_image_that_fails_to_decode(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    good = tmp_path / "good.png"
    assert cv2.imwrite(str(good), _bgr(8, 8))
    assert cli_main(["infer", str(tiny_ckpt), str(good), str(bad), "--out",
                     str(tmp_path / "o")]) == 1
    line = _error_line(capsys)
    assert line == f"ocrnet infer: error: cannot decode image (corrupt or unsupported file): {bad}"
    # In a dataset: the file is named too.
    root = tmp_path / "cache"
    SyntheticDataset("val", length=2, height=32, width=64).write_cityscapes_layout(root)
    broken = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[1]
    broken.write_bytes(broken.read_bytes()[:40])
    assert cli_main(["test", TINY, str(tiny_ckpt), "--data-root", str(root),
                     "--json", str(tmp_path / "m.json")]) == 1
    line = _error_line(capsys)
    assert "cannot decode image" in line and str(broken) in line
    assert cli_main(["infer", str(tiny_ckpt), str(tmp_path / "missing.png"), "--out",
                     str(tmp_path / "o")]) == 1
    assert _error_line(capsys).endswith(f"image not found: {tmp_path / 'missing.png'}")


def test_cli_checkpoint_that_does_not_fit_the_config(tmp_path, capsys):
    lite = tmp_path / "lite.pth"
    save_checkpoint(build_segmentor(SYNTHETIC_CONFIGS[LITE], fused=False, init=False), lite,
                    {"config": LITE})
    assert cli_main(["test", TINY, str(lite), "--limit", "1"]) == 1
    line = _error_line(capsys)
    assert line.startswith(f"ocrnet test: error: config {TINY}: checkpoint '{lite}' does not "
                           "fit the model: the checkpoint is HRNetV2p-W12, 7 classes; the model "
                           "is HRNetV2p-W8, 7 classes;")
    # The key listings are cut to three keys each.
    assert re.search(r"; unexpected keys \(84\): [^,;]+, [^,;]+, [^,;]+, \.\.\.; shape "
                     r"mismatches \(\d+\): ", line), line
    assert cli_main(["infer", str(lite), "x.png", "--config", TINY, "--out",
                     str(tmp_path / "o")]) == 1
    assert "does not fit the model" in _error_line(capsys)
    anonymous = tmp_path / "anon.pth"
    save_checkpoint(build_segmentor(CFG, fused=False, init=False), anonymous, {})
    assert cli_main(["infer", str(anonymous), "x.png", "--out", str(tmp_path / "o")]) == 1
    assert "names no known config" in _error_line(capsys)


# ========================================================================= ocrnet bench

class SleepModel(nn.Module):
    """A forward that takes at least 10 ms; counts its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.01)
        return x


def test_time_forwards_protocol():
    a, b = SleepModel(), SleepModel()
    res = time_forwards({"a": a, "b": b}, (1, 3, 4, 4), images=6, warmup=2)
    assert a.calls == b.calls == 8  # warm-up + timed, each model
    for r in res.values():
        assert r["images"] == 6 and r["warmup"] == 2
        # Only the forwards are timed: 6 x >= 10 ms, and not much more.
        assert 0.06 <= r["seconds"] < 0.06 + 6 * 0.05
        assert r["fps"] == pytest.approx(6 / r["seconds"]) and r["fps"] <= 100
        assert r["peak_mem_mib"] is None  # CPU: per-model peaks are CUDA only


def test_bench_config_and_cli(tmp_path, capsys):
    r = bench_config(TINY, fused=True, images=3, warmup=1, device="cpu")
    assert r["path"] == "fused" and r["shape"] == [1, 3, 32, 64] and r["images"] == 3
    assert r["fps"] > 0 and r["fps"] == pytest.approx(3 / r["seconds"])
    assert r["gflop"] == pytest.approx(count_flops(CFG, (1, 3, 32, 64))["total"] / 1e9)
    assert r["gmac"] == pytest.approx(r["gflop"] / 2)
    assert r["params_m"] == pytest.approx(count_parameters(build_segmentor(CFG, init=False))
                                          / 1e6)
    assert r["peak_mem_kind"] == "process RSS" and r["peak_mem_mib"] > 0
    # FLOPs = per-pixel work + the object attention's key / value projections of the K = 7
    # region vectors, which do not depend on the image size: f_object 32->16->16 and f_down
    # 32->16, 2 x 7 x (32*16 + 16*16 + 32*16) = 17920 FLOPs. 4x the pixels: 4x the rest.
    small = count_flops(CFG, (1, 3, 32, 64))
    big = count_flops(CFG, (1, 3, 64, 128))
    regions = 2 * 7 * (32 * 16 + 16 * 16 + 32 * 16)
    assert big["total"] - regions == 4 * (small["total"] - regions)
    assert big["backbone"] == 4 * small["backbone"] and big["aux_head"] == 4 * small["aux_head"]
    path = tmp_path / "b.json"
    assert cli_main(["bench", TINY, "--no-fused", "--images", "2", "--warmup", "0",
                     "--shape", "32", "48", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(reference), input 1x3x32x48" in out and "2 images after 0 warm-up" in out
    saved = json.loads(path.read_text())
    assert saved["path"] == "reference" and saved["shape"] == [1, 3, 32, 48]
    assert cli_main(["bench", TINY, "--images", "0"]) == 1
    assert "images must be >= 1" in _error_line(capsys)
