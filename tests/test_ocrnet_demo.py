"""`ocrnet demo` end to end (a few seconds of training) and the synthetic set's design."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ocrnet.data import SyntheticDataset
from ocrnet.data.synthetic import SYNTHETIC_PALETTE


def test_synthetic_classes_have_their_own_colour_families():
    # The demo relies on it: a solid object's pixels sit near its class's palette colour (the
    # per-instance jitter is at most 30 per channel, plus noise and a blur at the edges), and
    # the background stays far from every object colour.
    ds = SyntheticDataset("train", 60, seed=3)
    sums = {k: np.zeros(3) for k in range(7)}
    counts = dict.fromkeys(range(7), 0)
    for i in range(len(ds)):
        img, label, _ = ds[i]
        inner = cv2.erode(label, np.ones((5, 5), np.uint8))  # away from the blurred edges
        for k in range(7):
            sel = (label == k) & (inner == k)
            sums[k] += img[sel].astype(np.float64).sum(0)
            counts[k] += int(sel.sum())
    assert all(counts[k] > 500 for k in range(7)), counts
    for k in (1, 2, 3, 4):  # solid fills: the mean colour is the palette colour (BGR)
        mean_bgr = sums[k] / counts[k]
        assert np.abs(mean_bgr - np.asarray(SYNTHETIC_PALETTE[k])[::-1]).max() < 20, (k, mean_bgr)
    background = sums[0] / counts[0]
    assert np.ptp(background) < 20  # grey-ish on average
    for k in range(1, 7):
        assert np.linalg.norm(background - np.asarray(SYNTHETIC_PALETTE[k])[::-1]) > 60


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_runs_and_its_numbers_match_a_fresh_evaluation(tmp_path):
    import torch

    from ocrnet.api import init_model
    from ocrnet.demo import DEMO_CONFIG, run_demo
    from ocrnet.evaluate import evaluate
    from ocrnet.train import SYNTHETIC_CONFIGS

    work = tmp_path / "demo"
    out = run_demo(minutes=0.05, work_dir=work, json_path=tmp_path / "demo.json",
                   progress=False)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["iterations"] == out["iterations"] >= 1
    assert 0.0 <= saved["miou"] <= 1.0 and saved["fps"] > 0
    assert set(saved["per_class_iou"]) == set(SyntheticDataset.classes)
    # predictions.png: 6 rows of image | label | prediction, 2-pixel gutters, zoomed 2x.
    grid = cv2.imread(saved["png"])
    assert grid.shape == (2 * (6 * 64 + 5 * 2), 2 * 3 * 128, 3)
    # The reported mIoU is the checkpoint's: reload it and evaluate again.
    config = SYNTHETIC_CONFIGS[DEMO_CONFIG]
    ckpt = sorted(work.glob("iter_*.pth"))[-1]
    model = init_model(config, str(ckpt)).eval()
    val = SyntheticDataset("val", length=200, height=64, width=128, seed=0)
    with torch.no_grad():
        again = evaluate(model, val, config)
    assert again["miou"] == pytest.approx(saved["miou"], abs=1e-9)
