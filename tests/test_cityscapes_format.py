"""Cityscapes as its official tools see it (issue 20): polygon files rasterised pixel for pixel as
cityscapesScripts' ``json2labelImg`` does (trainIds and labelIds), and ``ocrnet test
--format-only`` predictions that cityscapesScripts' ``evalPixelLevelSemanticLabeling`` scores
with ocrnet's own mIoU.

The polygon files are generated with the cases where rasterisers disagree: poles 0-2 px wide,
``*group`` labels, ``deleted`` objects, license plates (negative id), polygons crossing the
border, self-intersecting and overlapping ones, non-integer coordinates (halves included).
cityscapesScripts is a test dependency (``make setup`` installs it): CI fails without it,
elsewhere these tests skip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO
from test_modules import randomise_batchnorm

from ocrnet.cli import main as cli_main
from ocrnet.configs import SYNTHETIC_CONFIGS, synthetic_config
from ocrnet.data import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CityscapesDataset, DataError,
                         build_collate, read_label)
from ocrnet.data import convert as conv
from ocrnet.models import build_segmentor
from ocrnet.models.checkpoint import save_checkpoint

STUFF = ("road", "sidewalk", "building", "wall", "fence", "vegetation", "terrain", "sky",
         "parking", "rail track", "guard rail", "bridge", "tunnel", "ground", "static",
         "dynamic", "ego vehicle", "rectification border", "out of roi")
THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "caravan",
          "trailer", "traffic light", "traffic sign", "pole")
GROUPS = ("cargroup", "persongroup", "bicyclegroup", "ridergroup", "motorcyclegroup",
          "polegroup", "truckgroup")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# Tiny models: one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _cityscapes_scripts():
    """cityscapesScripts is a test dependency: in CI its absence fails; elsewhere skip."""
    if importlib.util.find_spec("cityscapesscripts") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("cityscapesscripts missing: CI installs it with make setup")
        pytest.skip("cityscapesscripts not installed (pip install cityscapesscripts)")
    from cityscapesscripts.preparation.json2labelImg import json2labelImg
    return json2labelImg


# -- generated polygon files ------------------------------------------------------------------

def _star(rng, cx, cy, r, n, jitter=0.6):
    """n integer vertices around (cx, cy) at radii in [r (1 - jitter), r], in angle order."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(1 - jitter, 1, n)
    return [[int(round(cx + a * math.cos(t))), int(round(cy + a * math.sin(t)))]
            for t, a in zip(ang, rad)]


def _scene(rng, h: int, w: int, n: int) -> dict:
    """A polygon file of about ``n`` objects: sky, buildings, road and sidewalk over the border,
    then poles, groups, deleted objects, cars with plates, self-intersecting, fractional and
    ordinary polygons, each drawn over the earlier ones."""
    horizon = int(h * rng.uniform(0.35, 0.55))
    sky_line = [[int(x), int(horizon * rng.uniform(0.1, 0.9))]
                for x in np.linspace(-3, w + 3, 12)]
    objs = [{"label": "sky", "polygon": [[-5, -5], [w + 5, -5], [w + 5, horizon],
                                         [-5, horizon]]},
            {"label": "building", "polygon": sky_line + [[w + 3, horizon + 2],
                                                         [-3, horizon + 2]]},
            {"label": "road", "polygon": [[-10, h + 10], [w + 10, h + 10],
                                          [int(w * 0.6), horizon], [int(w * 0.4), horizon]]},
            {"label": "sidewalk", "polygon": [[-4, horizon + 3], [int(w * 0.38), horizon + 1],
                                              [int(w * 0.1), h + 4], [-4, h + 4]]}]
    small = min(h, w)
    while len(objs) < n:
        kind = int(rng.integers(0, 10))
        cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        if kind <= 2:  # a pole 0-2 px wide, upright or slanted
            wd, dx = int(rng.integers(0, 3)), int(rng.integers(-3, 4))
            x0, y0 = int(cx), int(rng.uniform(0, h * 0.6))
            y1 = y0 + int(rng.uniform(5, h * 0.6))
            objs.append({"label": "pole" if kind < 2 else "polegroup",
                         "polygon": [[x0, y0], [x0 + wd, y0], [x0 + wd + dx, y1],
                                     [x0 + dx, y1]]})
        elif kind == 3:
            objs.append({"label": str(rng.choice(GROUPS)),
                         "polygon": _star(rng, cx, cy, rng.uniform(2, 0.15 * small + 3),
                                          int(rng.integers(3, 20)))})
        elif kind == 4:  # drawn over everything if it were not skipped
            objs.append({"label": str(rng.choice(THINGS + STUFF)), "deleted": 1,
                         "polygon": _star(rng, cx, cy, rng.uniform(2, 0.2 * small + 3), 8)})
        elif kind == 5:
            objs.append({"label": "car", "polygon": _star(rng, cx, cy,
                                                          rng.uniform(3, 0.1 * small + 4),
                                                          12, 0.2)})
            x, y = int(cx), int(cy)
            objs.append({"label": "license plate",
                         "polygon": [[x - 2, y], [x + 3, y], [x + 3, y + 2], [x - 2, y + 2]]})
        elif kind == 6:  # vertices in random order: self-intersecting
            pts = _star(rng, cx, cy, rng.uniform(3, 0.2 * small + 3), int(rng.integers(4, 9)))
            rng.shuffle(pts)
            objs.append({"label": str(rng.choice(THINGS)), "polygon": pts})
        elif kind == 7:  # non-integer coordinates, exact halves included
            pts = _star(rng, cx, cy, rng.uniform(3, 0.15 * small + 3), int(rng.integers(3, 12)))
            pts = [[x + float(rng.choice([0.5, -0.5, 0.25, 0.7])),
                    y + float(rng.choice([0.5, -0.5, 0.3]))] for x, y in pts]
            objs.append({"label": str(rng.choice(THINGS + STUFF)), "polygon": pts})
        else:
            objs.append({"label": str(rng.choice(THINGS + STUFF)),
                         "polygon": _star(rng, cx, cy, rng.uniform(2, 0.25 * small + 2),
                                          int(rng.integers(3, 40)))})
    return {"imgHeight": h, "imgWidth": w, "objects": objs}


def _write_scene(path, scene: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scene))


def _cv2_fill(scene: dict) -> np.ndarray:
    """trainIds as the converter drew them before: cv2.fillPoly on rounded coordinates."""
    out = np.full((scene["imgHeight"], scene["imgWidth"]), 255, np.uint8)
    for obj in scene["objects"]:
        name = obj["label"]
        if name not in conv.CITYSCAPES_NAME_TO_ID and name.endswith("group"):
            name = name[:-len("group")]
        if obj.get("deleted") or conv.CITYSCAPES_NAME_TO_ID[name] < 0:
            continue
        pts = np.round(np.asarray(obj["polygon"], np.float64)).astype(np.int32)
        tid = conv.CITYSCAPES_ID_TO_TRAINID[conv.CITYSCAPES_NAME_TO_ID[name]]
        cv2.fillPoly(out, [pts.reshape(-1, 1, 2)], int(tid))
    return out


# (height, width, objects): one file in the real size, eleven small ones.
SIZES = [(1024, 2048, 80)] + [(64, 128, 30), (96, 160, 60), (33, 47, 30), (48, 96, 50)] * 2 + \
    [(128, 256, 80), (40, 40, 30), (20, 300, 40)]


def test_polygons_match_json2labelimg(tmp_path):
    json2label = _cityscapes_scripts()
    rng = np.random.default_rng(20)
    gt = tmp_path / "gtFine" / "train" / "aachen"
    scenes = {}
    for i, (h, w, n) in enumerate(SIZES):
        scenes[f"aachen_{i:06d}_000019"] = scene = _scene(rng, h, w, n)
        _write_scene(gt / f"aachen_{i:06d}_000019_gtFine_polygons.json", scene)
    objects = [o for s in scenes.values() for o in s["objects"]]
    # Every hard case is there, several times.
    assert sum(o["label"] == "pole" and len({x for x, _ in o["polygon"]}) <= 3
               for o in objects) >= 20
    assert sum(o["label"].endswith("group") for o in objects) >= 10
    assert sum(o.get("deleted", 0) == 1 for o in objects) >= 10
    assert sum(o["label"] == "license plate" for o in objects) >= 10
    assert sum(any(not float(v).is_integer() for p in o["polygon"] for v in p)
               for o in objects) >= 10
    assert conv.main(["cityscapes", str(tmp_path), "--label-ids", "-q"]) == 0
    differ = {"trainIds": 0, "labelIds": 0, "cv2": 0}
    pixels = 0
    for stem, scene in scenes.items():
        jp = gt / f"{stem}_gtFine_polygons.json"
        ref = {}
        for enc in ("trainIds", "ids"):
            json2label(str(jp), str(tmp_path / f"ref_{enc}.png"), enc)
            ref[enc] = read_label(tmp_path / f"ref_{enc}.png")
        tid = conv.cityscapes_polygons_to_train_ids(jp)
        lid = conv.cityscapes_polygons_to_label_ids(jp)
        assert tid.shape == lid.shape == (scene["imgHeight"], scene["imgWidth"])
        assert tid.dtype == lid.dtype == np.uint8
        # The files the converter wrote hold the same maps.
        np.testing.assert_array_equal(read_label(gt / f"{stem}_gtFine_labelTrainIds.png"), tid)
        np.testing.assert_array_equal(read_label(gt / f"{stem}_gtFine_labelIds.png"), lid)
        differ["trainIds"] += int((tid != ref["trainIds"]).sum())
        differ["labelIds"] += int((lid != ref["ids"]).sum())
        differ["cv2"] += int((_cv2_fill(scene) != ref["trainIds"]).sum())
        pixels += tid.size
    print(f"pixels differing from json2labelImg in {len(scenes)} files ({pixels} pixels): "
          f"{differ}")
    assert differ["trainIds"] == 0 and differ["labelIds"] == 0, differ
    # The comparison can fail: the previous cv2.fillPoly rasterisation differs on boundaries.
    assert differ["cv2"] > 0.001 * pixels, differ


def test_polygon_errors_name_file_and_object(tmp_path):
    jp = tmp_path / "x_000000_000000_gtFine_polygons.json"
    cases = [({"label": "car", "polygon": [[1, 1]]}, r"object 0 \('car'\)"),
             ({"label": "car"}, "object 0 needs a label and a polygon"),
             ({"polygon": [[0, 0], [3, 0], [3, 3]]}, "object 0 needs a label"),
             ({"label": "car", "polygon": [[1], [2]]}, "object 0 needs"),
             ({"label": "car", "polygon": [["a", 1], [2, 2], [3, 1]]}, r"object 0 \('car'\)"),
             ({"label": "carz", "polygon": [[0, 0], [3, 0], [3, 3]]}, "unknown .*'carz'")]
    for obj, pattern in cases:
        _write_scene(jp, {"imgHeight": 4, "imgWidth": 4, "objects": [obj]})
        with pytest.raises(DataError, match=pattern + ".*" + jp.name):
            conv.cityscapes_polygons_to_label_ids(jp)
    # Unknown labels of deleted objects are never looked at (as in json2labelImg).
    _write_scene(jp, {"imgHeight": 2, "imgWidth": 3, "objects": [
        {"label": "carz", "deleted": 1, "polygon": [[0, 0], [3, 0], [3, 3]]}]})
    assert conv.cityscapes_polygons_to_label_ids(jp).tolist() == [[0, 0, 0], [0, 0, 0]]
    for bad in ({"imgHeight": 0, "imgWidth": 4, "objects": []},
                {"imgHeight": 4, "imgWidth": 4, "objects": {}}, {"objects": []}):
        _write_scene(jp, bad)
        with pytest.raises(DataError, match=jp.name):
            conv.cityscapes_polygons_to_train_ids(jp)
    with pytest.raises(ValueError, match="label_ids=True needs the .*polygons.json source"):
        conv.convert_cityscapes(tmp_path, gt_dir=".", source="labelIds", label_ids=True)


def test_train_ids_to_label_ids_is_the_official_table():
    _cityscapes_scripts()
    from cityscapesscripts.helpers.labels import trainId2label
    train_ids = np.array([list(range(19)) + [255]], np.uint8)
    label_ids = conv.cityscapes_train_ids_to_label_ids(train_ids)
    assert label_ids.dtype == np.uint8
    assert label_ids[0, :19].tolist() == [trainId2label[t].id for t in range(19)]
    assert [trainId2label[t].name for t in range(19)] == list(CITYSCAPES_CLASSES)
    assert label_ids[0, 19] == 0  # ignore -> 'unlabeled'
    np.testing.assert_array_equal(conv.cityscapes_label_ids_to_train_ids(label_ids), train_ids)
    with pytest.raises(ValueError, match=r"train_ids holds \[19, 254\]"):
        conv.cityscapes_train_ids_to_label_ids(np.array([[19, 254, 3]], np.uint8))
    with pytest.raises(ValueError, match="train_ids must be an \\(H, W\\) uint8 array"):
        conv.cityscapes_train_ids_to_label_ids(np.zeros((2, 2), np.int64))


def test_ade20k_server_format_is_class_id_plus_one():
    """ADE20K's benchmark reads 1..150 (0 'other'): the model's 0..149 (after
    reduce_zero_label) + 1, as mmsegmentation's IoUMetric(format_only=True) writes them."""
    assert conv.SERVER_FORMATS["ade20k"] is conv.ade20k_class_ids_to_label_ids
    ids = np.array([[0, 1, 149], [75, 148, 2]], np.uint8)
    got = conv.ade20k_class_ids_to_label_ids(ids)
    assert got.dtype == np.uint8 and got.tolist() == [[1, 2, 150], [76, 149, 3]]
    with pytest.raises(ValueError, match="class_ids holds 150, not a class id"):
        conv.ade20k_class_ids_to_label_ids(np.array([[150]], np.uint8))
    with pytest.raises(ValueError, match=r"class_ids must be an \(H, W\) uint8 array"):
        conv.ade20k_class_ids_to_label_ids(np.zeros((2, 2, 1), np.uint8))


# -- ocrnet test --format-only and the official evaluation ------------------------------------

CITIES = {"aachen": ("000000_000019", "000001_000019"), "bochum": ("000000_000313",),
          "bonn": ("000004_000019",)}
H, W = 64, 128


def _tiny_cityscapes_model(tmp_path, root):
    """A 19-class tiny-HRNet config on the Cityscapes dataset (``config.json``) and a checkpoint
    of it fitted for 50 iterations to the val images under ``root`` (so that it predicts
    several classes, partly right)."""
    base = synthetic_config("ocrnet_hrtiny8_cityscapes-64x128", "w8_tiny", H, W, 1, 1,
                            channels=32, ocr_channels=16)
    cfg = base.replace(model=dataclasses.replace(base.model, num_classes=19),
                       data=dataclasses.replace(base.data, dataset="cityscapes"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    val = CityscapesDataset(root, "val")
    x, _, _ = build_collate(cfg, "val")([(val[i][0], None, {}) for i in range(len(val))])
    y = torch.from_numpy(np.stack([val[i][1] for i in range(len(val))])).long()
    torch.manual_seed(0)
    model = build_segmentor(cfg, fused=False).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(50):
        loss = sum(model.loss(x, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(model.eval(), ckpt, {"config": cfg.name})
    return path, ckpt


def _cityscapes_tree(root, rng, json2label) -> None:
    """leftImg8bit/{val,test} images (the GT colours plus noise) and gtFine/val polygons,
    labelTrainIds by ocrnet's converter, labelIds by cityscapesScripts."""
    palette = np.zeros((256, 3), np.uint8)
    for tid, rgb in enumerate(CITYSCAPES_PALETTE):
        palette[tid] = rgb[::-1]  # BGR
    for city, frames in CITIES.items():
        for frame in frames:
            stem = f"{city}_{frame}"
            jp = root / "gtFine" / "val" / city / f"{stem}_gtFine_polygons.json"
            _write_scene(jp, _scene(rng, H, W, 40))
            img = palette[conv.cityscapes_polygons_to_train_ids(jp)].astype(np.int16)
            img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
            for split in ("val", "test"):
                p = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(p), img)
            json2label(str(jp), str(jp.with_name(f"{stem}_gtFine_labelIds.png")), "ids")
    assert conv.main(["cityscapes", str(root), "-q"]) == 0


def test_format_only_scored_by_the_official_script(tmp_path, capsys):
    json2label = _cityscapes_scripts()
    root = tmp_path / "cityscapes"
    _cityscapes_tree(root, np.random.default_rng(3), json2label)
    config, ckpt = _tiny_cityscapes_model(tmp_path, root)
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    assert cli_main(["test", str(config), str(ckpt), "--data-root", str(root), "--format-only",
                     "--out", str(out), "--json", str(metrics), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    ours = json.loads(metrics.read_text())
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == sorted(f"{c}_{f}_leftImg8bit.png" for c, fs in CITIES.items() for f in fs)
    masks = {n: read_label(out / "masks" / n) for n in names}
    official_ids = set(conv.CITYSCAPES_TRAINID_TO_ID.values())
    assert all(m.shape == (H, W) and set(np.unique(m)) <= official_ids for m in masks.values())
    assert ours["images"] == 4 and ours["split"] == "val"
    # The official script's main(), as the server runs it: ground truth found under
    # CITYSCAPES_DATASET, the predictions matched by <city>_<seq>_<frame>*.png under
    # CITYSCAPES_RESULTS. Only its instance-level nIoU is switched off (it needs instanceIds
    # files and np.in1d, which NumPy 2.4 removed); the class IoU does not use it.
    export = tmp_path / "export"
    export.mkdir()
    env = dict(ENV, CITYSCAPES_DATASET=str(root), CITYSCAPES_RESULTS=str(out / "masks"),
               CITYSCAPES_EXPORT_DIR=str(export))
    driver = ("from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev\n"
              "ev.args.evalInstLevelScore = False\n"
              "ev.main()\n")
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Evaluating 4 pairs of images" in proc.stdout
    official = json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())
    # Both print the class average in percent to 2 decimals: the same number.
    official_miou = 100 * official["averageScoreClasses"]
    print(f"class-average IoU: evalPixelLevelSemanticLabeling {official_miou!r}, "
          f"ocrnet test {ours['mIoU']!r}")
    assert f"{official_miou:.2f}" == f"{ours['mIoU']:.2f}", (official_miou, ours["mIoU"])
    assert official_miou == pytest.approx(ours["mIoU"], rel=1e-9, abs=1e-9)
    assert f"{ours['mIoU']:.2f}" in printed
    for name in CITYSCAPES_CLASSES:  # per class too (nan where a class is nowhere)
        theirs, mine = official["classScores"][name], ours["IoU"][name]
        assert (mine is None) == math.isnan(theirs), name
        if mine is not None:
            assert 100 * theirs == pytest.approx(mine, rel=1e-9, abs=1e-9), name
    assert 10 < ours["mIoU"] < 90 and sum(v is not None and v > 0
                                          for v in ours["IoU"].values()) >= 4
    # The test split has no labels: the same images give the same files.
    test_out = tmp_path / "test_out"
    assert cli_main(["test", str(config), str(ckpt), "--data-root", str(root), "--split",
                     "test", "--format-only", "--out", str(test_out), "--device", "cpu"]) == 0
    assert "4 test images" in capsys.readouterr().err
    assert sorted(p.name for p in test_out.iterdir()) == ["masks"]  # no metrics
    for n, m in masks.items():
        np.testing.assert_array_equal(read_label(test_out / "masks" / n), m)


def test_format_only_other_datasets_and_bad_options(tmp_path, capsys):
    name = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
    torch.manual_seed(0)
    model = build_segmentor(SYNTHETIC_CONFIGS[name], fused=False)
    with torch.no_grad():
        randomise_batchnorm(model, mean_scale=0.2, bias_scale=0.5)
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(model.eval(), ckpt, {"config": name})
    common = ["test", name, str(ckpt), "--limit", "2", "--device", "cpu"]
    assert cli_main(common + ["--out", str(tmp_path / "a")]) == 0
    assert cli_main(common + ["--out", str(tmp_path / "b"), "--format-only"]) == 0
    capsys.readouterr()
    # No server format for the synthetic set: the class-id masks, as without --format-only,
    # and the metrics as well.
    for m in ("000000.png", "000001.png"):
        np.testing.assert_array_equal(read_label(tmp_path / "b" / "masks" / m),
                                      read_label(tmp_path / "a" / "masks" / m))
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["mIoU"] == b["mIoU"] and a["IoU"] == b["IoU"]
    for extra, message in (
            (["--format-only"], "--format-only needs --out DIR"),
            (["--split", "test"], "--split test has no labels to score; add --format-only"),
            (["--split", "test", "--format-only", "--out", str(tmp_path / "c")],
             "split 'test' exists for cityscapes only, not 'synthetic'"),
            (["--split", "test", "--format-only", "--out", str(tmp_path / "c"), "--json",
              str(tmp_path / "m.json")], "--json: --split test has no labels")):
        assert cli_main(common + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("ocrnet test: error: ") and message in err, err
