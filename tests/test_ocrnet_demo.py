"""`ocrnet demo` end to end (a few seconds of training) and the synthetic set's design."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ocrnet.data import SyntheticDataset
from ocrnet.data.synthetic import CLASS_FAMILY, COLOUR_FAMILIES


def test_synthetic_colour_families():
    # Disc and striped share red, square and checkered share green (texture tells each pair
    # apart), triangle and ring have families of their own; the solid fills sit near their
    # family's colour (jitter at most 30 per channel, plus noise and a blur at the edges), the
    # textured ones are that colour and a darker shade of it, and the background is grey-ish.
    ds = SyntheticDataset("train", 60, seed=3)
    sums = {k: np.zeros(3) for k in range(7)}
    light = {k: np.zeros(3) for k in (5, 6)}
    counts = dict.fromkeys(range(7), 0)
    for i in range(len(ds)):
        img, label, _ = ds[i]
        inner = cv2.erode(label, np.ones((5, 5), np.uint8))  # away from the blurred edges
        for k in range(7):
            sel = (label == k) & (inner == k)
            sums[k] += img[sel].astype(np.float64).sum(0)
            counts[k] += int(sel.sum())
    assert all(counts[k] > 500 for k in range(7)), counts
    mean = {k: sums[k] / counts[k] for k in range(7)}
    assert CLASS_FAMILY == {1: "red", 5: "red", 2: "green", 6: "green", 3: "blue",
                            4: "yellow"}
    for k in (1, 2, 3, 4):
        rgb = np.asarray(COLOUR_FAMILIES[CLASS_FAMILY[k]], np.float64)
        assert np.abs(mean[k] - rgb[::-1]).max() < 20, (k, mean[k])
    for k in (5, 6):  # half the family colour, half a 0.2-0.35x shade of it: about 0.64x
        rgb = np.asarray(COLOUR_FAMILIES[CLASS_FAMILY[k]], np.float64)[::-1]
        ratio = mean[k] / rgb
        bright = rgb > 100  # the strong channels of the family colour
        assert np.all((ratio[bright] > 0.5) & (ratio[bright] < 0.8)), (k, mean[k])
    assert np.ptp(mean[0]) < 20  # the background is grey-ish on average
    for rgb in COLOUR_FAMILIES.values():
        assert np.linalg.norm(mean[0] - np.asarray(rgb)[::-1]) > 60


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_runs_and_its_numbers_match_a_fresh_evaluation(tmp_path):
    import torch

    from ocrnet.api import init_model
    from ocrnet.commands.demo import DEMO_CONFIG, run_demo
    from ocrnet.configs import SYNTHETIC_CONFIGS
    from ocrnet.evaluation.evaluate import evaluate

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
