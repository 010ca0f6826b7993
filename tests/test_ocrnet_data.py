"""ocrnet.data: loaders on small files in the real layouts, converters, transforms, synthetic."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ocrnet.configs import get_config
from ocrnet.data import (ADE20KDataset, CityscapesDataset, DataError, PascalVOCDataset,
                         SyntheticDataset, TransformedDataset, build_collate, build_dataset,
                         build_pipeline, read_label, synthetic_data_config)
from ocrnet.data import convert as conv
from ocrnet.data.datasets import VOC_PALETTE
from ocrnet.data.transforms import (Pad, PhotoMetricDistortion, RandomCrop, RandomFlip,
                                    RandomResize, Resize, SegCollate, rescale_size)

MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, arr, ext=".png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, enc = cv2.imencode(ext, arr)
    assert ok
    path.write_bytes(enc.tobytes())


def _write_palette_png(path: Path, idx: np.ndarray, palette) -> None:
    """An 8-bit colour-type-3 PNG (as VOC's SegmentationClass), written without Pillow."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    h, w = idx.shape
    pal = np.zeros((256, 3), np.uint8)
    pal[:len(palette)] = palette
    pal[255] = (224, 224, 192)  # VOC's boundary colour
    raw = b"".join(b"\x00" + idx[r].astype(np.uint8).tobytes() for r in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", pal.tobytes()) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- Cityscapes ------------------------------------------------------------------------------

def _cityscapes_tree(root: Path, split="train", cities=("aachen", "bonn"), per_city=2,
                     h=16, w=32):
    items = []
    for c in cities:
        for k in range(per_city):
            stem = f"{c}_{k:06d}_000019"
            img = _img(h, w, seed=len(items))
            lab = np.random.default_rng(len(items)).integers(0, 19, (h, w)).astype(np.uint8)
            lab[0, :4] = 255
            _write(root / "leftImg8bit" / split / c / f"{stem}_leftImg8bit.png", img)
            _write(root / "gtFine" / split / c / f"{stem}_gtFine_labelTrainIds.png", lab)
            items.append((stem, img, lab))
    return items


def test_cityscapes_loader(tmp_path):
    items = _cityscapes_tree(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert len(ds) == 4 and ds.num_classes == 19 and ds.classes[0] == "road"
    assert ds.palette[18] == (119, 11, 32)
    for i, (stem, img, lab) in enumerate(sorted(items)):
        got_img, got_lab, meta = ds[i]
        assert stem in meta["img_path"] and stem in meta["seg_map_path"]
        assert got_img.dtype == np.uint8 and got_img.shape == (16, 32, 3)
        np.testing.assert_array_equal(got_img, img)  # BGR, as written by cv2
        np.testing.assert_array_equal(got_lab, lab)
        assert meta["ori_shape"] == (16, 32)


def test_cityscapes_errors_name_the_file(tmp_path):
    items = _cityscapes_tree(tmp_path)
    lab_path = tmp_path / "gtFine/train/aachen" / f"{items[0][0]}_gtFine_labelTrainIds.png"
    lab_path.unlink()
    with pytest.raises(FileNotFoundError, match=str(lab_path.name)):
        CityscapesDataset(tmp_path, "train")
    # out-of-range label value (19 with 19 classes; 255 is fine)
    bad = np.zeros((16, 32), np.uint8)
    bad[3, 3] = 19
    _write(lab_path, bad)
    ds = CityscapesDataset(tmp_path, "train")
    with pytest.raises(DataError, match=lab_path.name):
        ds[0]
    # corrupt image: a truncated PNG
    img_path = Path(ds.samples[1][0])
    img_path.write_bytes(img_path.read_bytes()[:40])
    with pytest.raises(DataError, match=img_path.name):
        ds[1]
    img_path.write_bytes(b"")
    with pytest.raises(DataError, match=img_path.name):
        ds[1]


# -- ADE20K ---------------------------------------------------------------------------------

def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 2, 150], [255, 7, 0, 1]], np.uint8).repeat(4, 0).repeat(4, 1)
    for sub in ("training", "validation"):
        _write(root / "images" / sub / f"ADE_{sub}_00000001.jpg", _img(8, 16), ".jpg")
        _write(root / "annotations" / sub / f"ADE_{sub}_00000001.png", raw)
    ds = ADE20KDataset(root, "training")
    assert len(ds) == 1 and ds.num_classes == 150 and ds.reduce_zero_label
    img, lab, meta = ds[0]
    assert img.shape == (8, 16, 3) and meta["img_path"].endswith(".jpg")
    want = np.array([[255, 0, 1, 149], [255, 6, 255, 0]], np.uint8).repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(lab, want)
    assert len(build_dataset("ade20k", root, "val")) == 1
    raw[0, 0] = 151  # -> 150 after reduction: out of range
    bad = root / "annotations/validation/ADE_validation_00000001.png"
    _write(bad, raw)
    with pytest.raises(DataError, match=bad.name):
        ADE20KDataset(root, "validation")[0]


# -- VOC + SBD ------------------------------------------------------------------------------

def _voc_tree(root: Path, train, val, aug):
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for name, ids in (("train", train), ("val", val), ("aug", aug)):
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    for k, i in enumerate(train + val + aug):
        _write(root / "JPEGImages" / f"{i}.jpg", _img(10, 12, k), ".jpg")
    for k, i in enumerate(train + val):
        idx = np.full((10, 12), k % 21, np.uint8)
        idx[0] = 255
        _write_palette_png(root / "SegmentationClass" / f"{i}.png", idx, VOC_PALETTE)
    for k, i in enumerate(aug):
        _write(root / "SegmentationClassAug" / f"{i}.png", np.full((10, 12), 20, np.uint8))


def test_read_label_palette_png(tmp_path):
    idx = np.arange(10 * 12).reshape(10, 12) % 21
    idx[0, :3] = 255
    _write_palette_png(tmp_path / "p.png", idx, VOC_PALETTE)
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), idx)
    # Palette padded with black (index 0 colour repeated): exact raw-index decoding. Reuse
    # cv2's grayscale IDAT (same bytes as 8-bit palette) to cover every PNG row filter.
    lab = (np.add.outer(np.arange(30) // 3, np.arange(40) // 5) % 21).astype(np.uint8)
    lab[::7, ::5] = 255
    for flt in (cv2.IMWRITE_PNG_FILTER_SUB, cv2.IMWRITE_PNG_FILTER_UP,
                cv2.IMWRITE_PNG_FILTER_AVG, cv2.IMWRITE_PNG_FILTER_PAETH):
        enc = cv2.imencode(".png", lab, [cv2.IMWRITE_PNG_FILTER, flt])[1].tobytes()
        ihdr = enc[16:25] + b"\x03" + enc[26:29]
        pal = b"PLTE" + bytes(768)
        data = (enc[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr
                + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + struct.pack(">I", 768) + pal
                + struct.pack(">I", zlib.crc32(pal)) + enc[33:])
        (tmp_path / "f.png").write_bytes(data)
        np.testing.assert_array_equal(read_label(tmp_path / "f.png"), lab)
    _write(tmp_path / "rgb.png", _img(4, 4))  # colour-coded label: rejected
    with pytest.raises(DataError, match="rgb.png"):
        read_label(tmp_path / "rgb.png")



@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_read_label_pillow_palette_png_shuffled(tmp_path, bits):
    # Pillow-written palette PNGs (as VOC's tools write them) with a shuffled palette, so that
    # colours and indices do not line up: the indices come back, at every bit depth.
    rng = np.random.default_rng(bits)
    colours = 1 << bits
    idx = rng.integers(0, colours, (23, 31)).astype(np.uint8)
    palette = rng.permutation(np.arange(256 * 3) % 256).astype(np.uint8)[:3 * colours]
    img = Image.fromarray(idx, "P")
    img.putpalette(palette.tobytes())
    img.save(tmp_path / "p.png", bits=bits)
    with Image.open(tmp_path / "p.png") as check:  # the file really is a palette PNG
        assert check.mode == "P"
    got = read_label(tmp_path / "p.png")
    assert got.dtype == np.uint8 and got.shape == (23, 31)
    np.testing.assert_array_equal(got, idx)
    # Every entry black (duplicate colours): still the indices, not the colours.
    img.putpalette(bytes(3 * colours))
    img.save(tmp_path / "black.png", bits=bits)
    np.testing.assert_array_equal(read_label(tmp_path / "black.png"), idx)


def test_read_label_modes_and_errors(tmp_path):
    lab = (np.arange(6 * 9).reshape(6, 9) % 21).astype(np.uint8)
    lab[0, 0] = 255
    Image.fromarray(lab, "L").save(tmp_path / "l.png")
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "i16.png")  # 16-bit, values <= 255
    Image.fromarray(lab > 10).save(tmp_path / "one.png")  # 1-bit: 0 / 255, as OpenCV gave
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), lab)
    np.testing.assert_array_equal(read_label(tmp_path / "i16.png"), lab)
    np.testing.assert_array_equal(read_label(tmp_path / "one.png"), (lab > 10) * 255)
    Image.fromarray(lab.astype(np.uint16) * 300).save(tmp_path / "big16.png")
    with pytest.raises(DataError, match=r"0\.\.255 \(dtype uint16\): .*big16\.png"):
        read_label(tmp_path / "big16.png")
    Image.fromarray(np.stack([lab, lab], -1), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([lab] * 4, -1), "RGBA").save(tmp_path / "rgba.png")
    for name in ("la.png", "rgba.png"):
        with pytest.raises(DataError, match="single-channel.*" + name):
            read_label(tmp_path / name)
    # Corrupt and truncated PNGs fail as they did with OpenCV (libpng checks chunk CRCs).
    data = (tmp_path / "l.png").read_bytes()
    flipped = bytearray(data)
    flipped[data.index(b"IDAT") + 6] ^= 0xFF
    (tmp_path / "crc.png").write_bytes(bytes(flipped))
    (tmp_path / "cut.png").write_bytes(data[:-10])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name in ("crc.png", "cut.png", "junk.png"):
        with pytest.raises(DataError, match="cannot decode label.*" + name):
            read_label(tmp_path / name)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.*empty.png"):
        read_label(tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label(tmp_path / "missing.png")

def test_voc12aug_concatenates_train_and_aug(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    train, val = ["2007_000032", "2007_000039"], ["2007_000033"]
    aug = ["2008_000002", "2008_000003", "2008_000004"]
    _voc_tree(root, train, val, aug)
    ds = build_dataset("voc12aug", root, "train")
    assert len(ds) == 5 and ds.num_classes == 21
    _, lab, meta = ds[1]
    assert "SegmentationClass/" in meta["seg_map_path"].replace("\\", "/")
    assert lab[0].tolist() == [255] * 12 and (lab[1:] == 1).all()
    _, lab, meta = ds[2]
    assert "SegmentationClassAug" in meta["seg_map_path"] and (lab == 20).all()
    assert len(build_dataset("voc12aug", root, "val")) == 1
    (root / "JPEGImages" / "2008_000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000004.jpg"):
        PascalVOCDataset(root, "aug")


# -- converters -----------------------------------------------------------------------------

def _poly(label, pts, **kw):
    return {"label": label, "polygon": pts, **kw}


def test_convert_cityscapes_polygons(tmp_path):
    h, w = 20, 40
    objs = [
        _poly("road", [[0, 10], [39, 10], [39, 19], [0, 19]]),          # bottom half: 0
        _poly("cargroup", [[5, 5], [15, 5], [15, 15], [5, 15]]),         # car 13 over road
        _poly("person", [[10, 8], [12, 8], [12, 12], [10, 12]]),         # person 11 over car
        _poly("license plate", [[6, 12], [8, 12], [8, 14], [6, 14]]),    # id -1: not drawn
        _poly("sky", [[30, 0], [39, 0], [39, 5], [30, 5]], deleted=1),   # deleted: not drawn
        _poly("parking", [[20, 0], [25, 0], [25, 4], [20, 4]]),          # trainId 255
    ]
    gt = tmp_path / "gtFine" / "train" / "aachen"
    gt.mkdir(parents=True)
    jp = gt / "aachen_000000_000019_gtFine_polygons.json"
    jp.write_text(json.dumps({"imgHeight": h, "imgWidth": w, "objects": objs}))
    tid = conv.cityscapes_polygons_to_train_ids(jp)
    assert tid.shape == (h, w) and tid.dtype == np.uint8
    assert tid[18, 30] == 0 and tid[2, 2] == 255
    assert tid[7, 7] == 13 and tid[13, 7] == 13 and tid[10, 11] == 11
    assert tid[2, 35] == 255 and tid[2, 22] == 255
    assert conv.main(["cityscapes", str(tmp_path), "-q"]) == 0
    out = gt / "aachen_000000_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(read_label(out), tid)
    assert (tmp_path / "train.txt").read_text() == "aachen/aachen_000000_000019\n"
    _write(tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
           _img(h, w))
    assert CityscapesDataset(tmp_path, "train")[0][1].max() == 255
    objs.append(_poly("unicorn", [[0, 0], [1, 0], [1, 1]]))
    jp.write_text(json.dumps({"imgHeight": h, "imgWidth": w, "objects": objs}))
    with pytest.raises(DataError, match="unicorn.*" + jp.name):
        conv.cityscapes_polygons_to_train_ids(jp)
    assert conv.main(["cityscapes", str(tmp_path), "-q"]) == 1


def test_convert_cityscapes_label_ids(tmp_path):
    ids = np.array([[0, 7, 8, 26], [33, 34, 255, 24]], np.uint8)
    np.testing.assert_array_equal(conv.cityscapes_label_ids_to_train_ids(ids),
                                  [[255, 0, 1, 13], [18, 255, 255, 11]])
    assert conv.CITYSCAPES_ID_TO_TRAINID[31] == 16 and len(conv.CITYSCAPES_ID_TO_TRAINID) == 34
    p = tmp_path / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelIds.png"
    _write(p, ids)
    assert conv.convert_cityscapes(tmp_path, progress=False) == 1
    out = p.with_name("bonn_000000_000019_gtFine_labelTrainIds.png")
    assert read_label(out)[0].tolist() == [255, 0, 1, 13]


def test_convert_voc_aug(tmp_path):
    from scipy.io import savemat
    devkit, sbd = tmp_path / "VOCdevkit", tmp_path / "SBD"
    voc = devkit / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    (sbd / "dataset" / "cls").mkdir(parents=True)
    (sbd / "dataset" / "train.txt").write_text("b\nc\nd\n")
    (sbd / "dataset" / "val.txt").write_text("e\n")
    segs = {}
    for k, i in enumerate("bcde"):
        seg = np.full((6, 7), k + 1, np.uint8)
        seg[0, 0] = 255
        segs[i] = seg
        savemat(sbd / "dataset" / "cls" / f"{i}.mat",
                {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 1), object),
                           "CategoriesPresent": np.array([[k + 1]])}})
    np.testing.assert_array_equal(conv.sbd_mat_to_label(sbd / "dataset/cls/d.mat"), segs["d"])
    assert conv.main(["voc-aug", str(devkit), str(sbd), "-q"]) == 0
    assert (sets / "aug.txt").read_text() == "d\ne\n"        # SBD minus VOC train and val
    assert (sets / "trainaug.txt").read_text() == "a\nb\nd\ne\n"
    for i, seg in segs.items():
        np.testing.assert_array_equal(read_label(voc / "SegmentationClassAug" / f"{i}.png"),
                                      seg)
    savemat(sbd / "dataset" / "cls" / "f.mat", {"other": np.zeros((2, 2))})
    with pytest.raises(DataError, match="f.mat"):
        conv.sbd_mat_to_label(sbd / "dataset" / "cls" / "f.mat")


# -- transforms -----------------------------------------------------------------------------

class _ScriptedRng:
    """Stands in for a Generator: ``integers`` returns scripted values."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, lo, hi=None):
        return self.values.pop(0)


def test_random_crop_cat_max_ratio():
    img = _img(40, 80)
    lab = np.zeros((40, 80), np.uint8)
    lab[:, 40:] = 1
    crop = RandomCrop((20, 20), cat_max_ratio=0.75)
    # draws (y, x): (0, 0) all class 0 -> retry; (0, 5) still all 0 -> retry; (0, 30): 50/50 ok
    rng = _ScriptedRng([0, 0, 0, 5, 0, 30, 0, 0])
    _, out, meta = crop(img, lab, {}, rng)
    assert meta["crop_bbox"] == (0, 20, 30, 50) and (out == 1).mean() == 0.5
    # ignored pixels do not count: 255 everywhere but a balanced strip passes
    lab2 = np.full((40, 80), 255, np.uint8)
    lab2[:, 0:3], lab2[:, 3:6] = 4, 5
    assert RandomCrop((40, 20), 0.75)(img, lab2, {}, _ScriptedRng([0, 0]))[2]["crop_bbox"] == \
        (0, 40, 0, 20)
    # cat_max_ratio 1: the first draw is kept
    assert RandomCrop((20, 20), 1.0)(img, lab, {}, _ScriptedRng([0, 0]))[2]["crop_bbox"][2] == 0
    # after 10 failed retries the 11th draw is kept unchecked
    one = np.zeros((40, 80), np.uint8)
    out = RandomCrop((20, 20), 0.75)(img, one, {}, _ScriptedRng([0, 0] * 10 + [3, 7]))
    assert out[2]["crop_bbox"] == (3, 23, 7, 27)
    # with a real generator, crops of a striped label satisfy the rule
    stripes = (np.arange(80)[None, :].repeat(40, 0) // 8 % 3).astype(np.uint8)
    for seed in range(20):
        _, c, _ = RandomCrop((16, 16), 0.75)(img, stripes, {}, np.random.default_rng(seed))
        cnt = np.bincount(c.ravel())
        assert c.shape == (16, 16) and cnt.max() / cnt.sum() < 0.75
    # image smaller than the crop: taken whole
    assert RandomCrop((64, 64))(img, lab, {}, np.random.default_rng(0))[0].shape == (40, 64, 3)


def test_resize_and_random_resize_ratio_range():
    assert rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert rescale_size((375, 500), (2048, 512)) == (512, 683)   # short side bound
    assert rescale_size((100, 1000), (2048, 512)) == (205, 2048)  # long side bound
    img, lab = _img(50, 100), np.zeros((50, 100), np.uint8)
    out_img, out_lab, meta = Resize((200, 100), resize_label=False)(img, lab, {})
    assert out_img.shape == (100, 200, 3) and out_lab.shape == (50, 100)
    rr = RandomResize((200, 100), (0.5, 2.0))
    ratios = []
    for seed in range(60):
        oi, ol, m = rr(img, lab, {}, np.random.default_rng(seed))
        r = m["resize_ratio"]
        ratios.append(r)
        assert 0.5 <= r < 2.0
        assert oi.shape[:2] == ol.shape == rescale_size((50, 100), m["scale"])
        assert abs(oi.shape[1] / oi.shape[0] - 2.0) < 0.05
    assert min(ratios) < 0.7 and max(ratios) > 1.8
    # labels are resized with nearest neighbour: no new values appear
    lab3 = (np.arange(100)[None].repeat(50, 0) % 3 * 7).astype(np.uint8)
    _, ol, _ = rr(img, lab3, {}, np.random.default_rng(1))
    assert set(np.unique(ol)) <= {0, 7, 14}


def test_random_flip_image_and_label_together():
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0] = np.arange(6)[None]
    lab = np.arange(6, dtype=np.uint8)[None].repeat(4, 0)
    flips = 0
    for seed in range(200):
        oi, ol, m = RandomFlip(0.5)(img, lab, {}, np.random.default_rng(seed))
        np.testing.assert_array_equal(oi[..., 0], ol)
        if m["flip"]:
            flips += 1
            assert ol[0].tolist() == [5, 4, 3, 2, 1, 0]
        else:
            assert ol[0].tolist() == list(range(6))
    assert 70 < flips < 130
    assert not RandomFlip(0.0)(img, lab, {}, np.random.default_rng(0))[2]["flip"]


def test_photometric_distortion_ranges():
    img = np.random.default_rng(0).integers(40, 216, (8, 8, 3), dtype=np.uint8)
    pmd = PhotoMetricDistortion()
    seen = {"brightness": [], "contrast": [], "saturation": [], "hue": []}
    for seed in range(300):
        out, _, m = pmd(img, None, {}, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == img.shape
        for k, v in m["photometric"].items():
            seen[k].append(v)
    b, c, s, h = (np.array(seen[k]) for k in ("brightness", "contrast", "saturation", "hue"))
    assert b.min() >= -32 and b.max() <= 32 and c.min() >= 0.5 and c.max() <= 1.5
    assert s.min() >= 0.5 and s.max() <= 1.5 and h.min() >= -18 and h.max() <= 17
    for arr in (b, c, s, h):  # each step applied with probability 0.5
        assert 110 < len(arr) < 190
    # brightness alone: every pixel moves by the same clipped, truncated delta
    only_b = PhotoMetricDistortion(contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
    for seed in range(10):
        out, _, m = only_b(img, None, {}, np.random.default_rng(seed))
        beta = m["photometric"].get("brightness", 0.0)
        want = np.clip(img.astype(np.float32) + beta, 0, 255).astype(np.uint8)
        if "saturation" not in m["photometric"] and "hue" not in m["photometric"]:
            np.testing.assert_array_equal(out, want)


def test_padding_normalisation_and_collate():
    img = np.zeros((3, 4, 3), np.uint8)
    img[..., 0], img[..., 2] = 10, 200  # B = 10, R = 200
    lab = np.ones((3, 4), np.uint8)
    images, labels, metas = SegCollate(size=(5, 6))([(img, lab, {"i": 0}), (img, lab, {})])
    assert images.shape == (2, 3, 5, 6) and images.dtype == torch.float32
    assert labels.shape == (2, 5, 6) and labels.dtype == torch.int64 and metas[0] == {"i": 0}
    rgb = np.array([200, 0, 10], np.float32)
    np.testing.assert_allclose(images[0, :, 0, 0].numpy(), (rgb - MEAN) / STD, rtol=1e-6)
    assert (images[:, :, 3:] == 0).all() and (images[:, :, :, 4:] == 0).all()
    assert (labels[:, 3:] == 255).all() and (labels[:, :, 4:] == 255).all()
    assert (labels[:, :3, :4] == 1).all()
    pi, pl, _ = Pad((5, 6))(img, lab, {})
    assert pi.shape == (5, 6, 3) and (pi[3:] == 0).all() and (pl[:, 4:] == 255).all()


def test_build_pipeline_same_seed_same_output():
    cfg = get_config("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024")
    names = [type(t).__name__ for t in build_pipeline(cfg, "train").transforms]
    assert names == ["RandomResize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion"]
    voc = get_config("ocrnet_hr18s_4xb4-20k_voc12aug-512x512")
    assert type(build_pipeline(voc, "train").transforms[-1]).__name__ == "Pad"
    test = build_pipeline(cfg, "val").transforms
    assert len(test) == 1 and test[0].scale == (2048, 1024) and not test[0].resize_label
    data = synthetic_data_config(64, 128)
    pipe = build_pipeline(data, "train")
    img, lab, meta = SyntheticDataset("train", 4)[0]
    a = pipe(img, lab, meta, np.random.default_rng(7))
    b = pipe(img, lab, meta, np.random.default_rng(7))
    c = pipe(img, lab, meta, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2]["crop_bbox"] == b[2]["crop_bbox"]
    assert not (a[0].shape == c[0].shape and np.array_equal(a[0], c[0]))
    ds = TransformedDataset(SyntheticDataset("train", 4), pipe, seed=3)
    batch = build_collate(data, "train")([ds[0], ds[1]])
    assert batch[0].shape == (2, 3, 64, 128) and batch[1].shape == (2, 64, 128)
    np.testing.assert_array_equal(ds[1][0], ds[1][0])


# -- synthetic ------------------------------------------------------------------------------

def test_synthetic_deterministic_and_classes(tmp_path):
    ds = SyntheticDataset("train", 40, height=64, width=128, seed=1)
    img, lab, meta = ds[5]
    assert img.shape == (64, 128, 3) and img.dtype == np.uint8 and lab.dtype == np.uint8
    img2, lab2, _ = SyntheticDataset("train", 40, seed=1)[5]
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
    val_img, _, _ = SyntheticDataset("val", 40, seed=1)[5]
    assert not np.array_equal(img, val_img)
    counts = np.zeros(256, np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds[i][1].ravel(), minlength=256)
    assert (counts[:7] > 0).all() and counts[7:].sum() == 0
    assert 0.4 < counts[0] / counts.sum() < 0.9  # background present, but not everything
    bordered = SyntheticDataset("val", 3, ignore_border=1)[0][1]
    assert (bordered == 255).any() and set(np.unique(bordered)) <= set(range(7)) | {255}
    small = SyntheticDataset("val", 3, seed=1)
    small.write_cityscapes_layout(tmp_path)
    cached = SyntheticDataset.load_cached(tmp_path, "val")
    assert len(cached) == 3 and cached.num_classes == 7
    for i in range(3):
        np.testing.assert_array_equal(cached[i][0], small[i][0])
        np.testing.assert_array_equal(cached[i][1], small[i][1])
    assert len(build_dataset("synthetic", tmp_path, "val")) == 3
