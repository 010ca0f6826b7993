"""Dataset converters (functions and a command line), following mmsegmentation's
``tools/dataset_converters/{cityscapes,voc_aug}.py``.

    python -m ocrnet.data.convert cityscapes data/cityscapes
    python -m ocrnet.data.convert voc-aug data/VOCdevkit data/VOCaug

* ``cityscapes``: every ``gtFine/**/*_gtFine_polygons.json`` (or, with ``--source labelIds``
  or when no json exists, ``*_gtFine_labelIds.png``) becomes ``*_gtFine_labelTrainIds.png``
  beside it, through the official labelId -> trainId table of cityscapesScripts
  (``helpers/labels.py``); with ``--label-ids`` the json also becomes ``*_gtFine_labelIds.png``.
  Polygons are filled as cityscapesScripts' ``json2labelImg`` fills them (what mmseg's
  converter calls and what published Cityscapes numbers were evaluated on): Pillow's
  ``ImageDraw.polygon`` on an 8-bit image of the 'unlabeled' value, objects in file order,
  coordinates as stored; with the same Pillow the label maps are pixel-identical to its
  ``trainIds`` and ``ids`` outputs. Also writes ``{train,val,test}.txt`` (``<city>/<name>``
  per line) into the Cityscapes root, as mmseg's converter does.
* ``voc-aug``: every SBD ``dataset/cls/*.mat`` (struct ``GTcls``, field ``Segmentation``)
  becomes ``VOC2012/SegmentationClassAug/<id>.png``; ``ImageSets/Segmentation/aug.txt`` gets
  the SBD train+val ids not in VOC train or val (mmseg trains on train.txt + aug.txt, 10,582
  images on the real data) and ``trainaug.txt`` the union of VOC train and SBD minus VOC val.

All outputs are written atomically (temp file + ``ocrnet.utils.fileio``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils.fileio import write_text_atomic
from .io import DataError, Progress, read_label, write_png_atomic

__all__ = ["CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_NAME_TO_ID", "CITYSCAPES_TRAINID_TO_ID",
           "SERVER_FORMATS", "ade20k_class_ids_to_label_ids", "cityscapes_label_ids_to_train_ids",
           "cityscapes_polygons_to_label_ids", "cityscapes_polygons_to_train_ids",
           "cityscapes_train_ids_to_label_ids", "convert_cityscapes", "sbd_mat_to_label",
           "convert_voc_aug", "main"]

# cityscapesScripts helpers/labels.py: (name, id, trainId); id -1 (license plate) is never
# drawn. trainId 255 = ignored in training.
_CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
    ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12),
    ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255),
    ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
)
CITYSCAPES_NAME_TO_ID = {name: lid for name, lid, _ in _CITYSCAPES_LABELS}
CITYSCAPES_ID_TO_TRAINID = {lid: tid for _, lid, tid in _CITYSCAPES_LABELS if lid >= 0}
# The 19 evaluated classes back to their labelIds (one labelId per trainId).
CITYSCAPES_TRAINID_TO_ID = {tid: lid for _, lid, tid in _CITYSCAPES_LABELS if 0 <= tid < 255}

# Lookup tables over all uint8 values. labelId -> trainId: ids outside the table are ignored.
_ID_LUT = np.full(256, 255, np.uint8)
for _lid, _tid in CITYSCAPES_ID_TO_TRAINID.items():
    _ID_LUT[_lid] = _tid
# trainId -> labelId: 255 (ignore) -> 0 ('unlabeled'); 19..254 are refused.
_TRAIN_LUT = np.zeros(256, np.uint8)
for _tid, _lid in CITYSCAPES_TRAINID_TO_ID.items():
    _TRAIN_LUT[_tid] = _lid


def _check_map(array: np.ndarray, fn: str, arg: str) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 2:
        what = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else \
            type(array).__name__
        raise ValueError(f"{fn}: {arg} must be an (H, W) uint8 array, got {what}")


def cityscapes_label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 Cityscapes labelIds -> (H, W) uint8 trainIds (0..18, 255 ignore)."""
    _check_map(label_ids, "cityscapes_label_ids_to_train_ids", "label_ids")
    return _ID_LUT[label_ids]


def cityscapes_train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 trainIds (0..18; 255 -> 0 'unlabeled') -> (H, W) uint8 labelIds, through
    the official table: what the Cityscapes benchmark server and cityscapesScripts'
    ``evalPixelLevelSemanticLabeling`` read. Values 19..254 raise ValueError."""
    _check_map(train_ids, "cityscapes_train_ids_to_label_ids", "train_ids")
    bad = (train_ids >= len(CITYSCAPES_TRAINID_TO_ID)) & (train_ids != 255)
    if bad.any():
        raise ValueError(f"cityscapes_train_ids_to_label_ids: train_ids holds "
                         f"{np.unique(train_ids[bad])[:10].tolist()}, not trainIds "
                         f"(0..{len(CITYSCAPES_TRAINID_TO_ID) - 1} or 255)")
    return _TRAIN_LUT[train_ids]


def ade20k_class_ids_to_label_ids(class_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 class ids 0..149 (the model's, after reduce_zero_label) -> the ADE20K
    benchmark's 1..150 (0 is 'other', never predicted), as mmsegmentation's ``format_only``
    writes them. Values above 149 raise ValueError."""
    _check_map(class_ids, "ade20k_class_ids_to_label_ids", "class_ids")
    if class_ids.size and int(class_ids.max()) > 149:
        raise ValueError(f"ade20k_class_ids_to_label_ids: class_ids holds "
                         f"{int(class_ids.max())}, not a class id (0..149)")
    return class_ids + np.uint8(1)


# What ``ocrnet test --format-only`` writes for a dataset (``DataConfig.dataset``): a function
# from a predicted class-id map to the benchmark's encoding. Datasets not listed: class ids.
SERVER_FORMATS = {"cityscapes": cityscapes_train_ids_to_label_ids,
                  "ade20k": ade20k_class_ids_to_label_ids}


def _read_polygons(json_path: Path) -> tuple[int, int, list[tuple[int, str, bool, list]]]:
    """(height, width, [(object index, label, deleted, points)]) of a polygon file; points as
    stored (each point's first two values), as cityscapesScripts' ``Annotation`` reads them."""
    try:
        ann = json.loads(json_path.read_text())
        h, w = int(ann["imgHeight"]), int(ann["imgWidth"])
        objects = ann["objects"]
        if not isinstance(objects, list):
            raise TypeError(f"'objects' is a {type(objects).__name__}, not a list")
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"not a Cityscapes polygon file ({exc!r}): {json_path}") from exc
    if h <= 0 or w <= 0:
        raise DataError(f"imgHeight and imgWidth must be positive, got {h} x {w}: {json_path}")
    out = []
    for k, obj in enumerate(objects):
        try:
            out.append((k, str(obj["label"]), bool(obj.get("deleted", 0)),
                        [(p[0], p[1]) for p in obj["polygon"]]))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise DataError(f"object {k} needs a label and a polygon of [x, y] points "
                            f"({exc!r}) in {json_path}") from exc
    return h, w, out


def cityscapes_polygons_to_label_ids(json_path: str | os.PathLike) -> np.ndarray:
    """Rasterise a ``*_gtFine_polygons.json`` to (imgHeight, imgWidth) uint8 labelIds, pixel for
    pixel as cityscapesScripts' ``json2labelImg(..., 'ids')`` (with the same Pillow).

    Pillow's ``ImageDraw.polygon`` fills each object on an 8-bit image of 'unlabeled' (0), in
    file order (later objects over earlier ones), with the coordinates as stored (non-integer
    ones as Pillow places them, which is not rounding; clipped at the border); objects with a true
    ``deleted`` and labels of negative id (license plate) are skipped; ``<name>group`` counts
    as ``<name>`` unless ``<name>group`` is a label itself (polegroup). Unknown labels and
    malformed objects raise :class:`DataError` naming the file and the object.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ImportError("the Cityscapes polygon converter needs Pillow (`pip install "
                          "pillow`): it fills polygons as cityscapesScripts does") from exc
    json_path = Path(json_path)
    h, w, objects = _read_polygons(json_path)
    img = Image.new("L", (w, h), CITYSCAPES_NAME_TO_ID["unlabeled"])
    draw = ImageDraw.Draw(img)
    for k, label, deleted, points in objects:
        if deleted:
            continue
        name = label
        if name not in CITYSCAPES_NAME_TO_ID and name.endswith("group"):
            name = name[:-len("group")]
        if name not in CITYSCAPES_NAME_TO_ID:
            raise DataError(f"unknown Cityscapes label {label!r} (object {k}) in {json_path}")
        label_id = CITYSCAPES_NAME_TO_ID[name]
        if label_id < 0:
            continue
        try:
            draw.polygon(points, fill=label_id)
        except (TypeError, ValueError) as exc:  # fewer than 2 points, non-numbers
            raise DataError(f"cannot draw the polygon of object {k} ({label!r}): {exc} in "
                            f"{json_path}") from exc
    return np.array(img)


def cityscapes_polygons_to_train_ids(json_path: str | os.PathLike) -> np.ndarray:
    """Rasterise a ``*_gtFine_polygons.json`` to (imgHeight, imgWidth) uint8 trainIds (255
    background), pixel for pixel as ``json2labelImg(..., 'trainIds')``: the labelIds of
    :func:`cityscapes_polygons_to_label_ids` through the official table (the fill does not
    depend on the value drawn, so this equals drawing trainIds)."""
    return _ID_LUT[cityscapes_polygons_to_label_ids(json_path)]


def convert_cityscapes(root: str | os.PathLike, gt_dir: str = "gtFine", source: str = "auto",
                       split_lists: bool = True, progress: bool = True,
                       label_ids: bool = False) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` beside every source annotation under
    ``root/gt_dir``. ``source``: "json" (``*_polygons.json``), "labelIds"
    (``*_labelIds.png``) or "auto" (json if any exist, else labelIds). ``label_ids``: also
    write ``*_gtFine_labelIds.png`` from the json (replacing existing ones). Returns the
    count."""
    root = Path(root)
    gt = root / gt_dir
    if not gt.is_dir():
        raise FileNotFoundError(f"convert_cityscapes: annotation folder not found: {gt}")
    if source not in ("auto", "json", "labelIds"):
        raise ValueError(f"convert_cityscapes: source must be auto, json or labelIds, got "
                         f"{source!r}")
    jsons = sorted(gt.rglob("*_polygons.json"))
    if source == "json" or (source == "auto" and jsons):
        files, suffix = jsons, "_polygons.json"
    else:
        files, suffix = sorted(gt.rglob("*_labelIds.png")), "_labelIds.png"
    if label_ids and suffix != "_polygons.json":
        raise ValueError("convert_cityscapes: label_ids=True needs the *_polygons.json source "
                         "(the labelIds are what it would write)")
    if not files:
        raise DataError(f"convert_cityscapes: no *{suffix} files under {gt}")
    bar = Progress(len(files), f"cityscapes {suffix}", enabled=progress)
    for f in files:
        stem = f.name[:-len(suffix)]
        if suffix == "_polygons.json":
            ids = cityscapes_polygons_to_label_ids(f)
            if label_ids:
                write_png_atomic(f.with_name(stem + "_labelIds.png"), ids)
        else:
            ids = read_label(f)
        write_png_atomic(f.with_name(stem + "_labelTrainIds.png"),
                         cityscapes_label_ids_to_train_ids(ids))
        bar.step()
    bar.close()
    if split_lists:
        for split in ("train", "val", "test"):
            d = gt / split
            if d.is_dir():
                tail = f"_{gt_dir}{suffix}"
                names = sorted(p.relative_to(d).as_posix()[:-len(tail)]
                               for p in d.rglob(f"*{tail}"))
                write_text_atomic(root / f"{split}.txt", _lines(names), make_parents=True)
    return len(files)


def _lines(items: Sequence[str]) -> str:
    """One item per line, each newline-terminated."""
    return "".join(f"{item}\n" for item in items)


def sbd_mat_to_label(mat_path: str | os.PathLike) -> np.ndarray:
    """An SBD ``cls/*.mat`` -> (H, W) uint8 class map (``GTcls.Segmentation``), as mmseg's
    voc_aug converter reads it (``loadmat(f)['GTcls'][0]['Segmentation'][0]``)."""
    from scipy.io import loadmat
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise FileNotFoundError(f"SBD .mat file not found: {mat_path}")
    try:
        data = loadmat(mat_path)
        seg = np.asarray(data["GTcls"][0]["Segmentation"][0])
    except (KeyError, ValueError, IndexError, TypeError, OSError) as exc:
        raise DataError(f"not an SBD class file (struct GTcls with field Segmentation) "
                        f"({exc!r}): {mat_path}") from exc
    if seg.ndim != 2 or seg.size == 0:
        raise DataError(f"GTcls.Segmentation must be a 2-D array, got {seg.shape}: {mat_path}")
    if seg.min() < 0 or seg.max() > 255:
        raise DataError(f"GTcls.Segmentation values outside 0..255: {mat_path}")
    return seg.astype(np.uint8)


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"id list not found: {path}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def convert_voc_aug(devkit: str | os.PathLike, sbd: str | os.PathLike,
                    out_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> dict[str, int]:
    """SBD -> ``SegmentationClassAug`` PNGs plus ``aug.txt`` and ``trainaug.txt``.

    ``devkit``: the ``VOCdevkit`` folder (holding ``VOC2012/``); ``sbd``: the SBD folder
    (holding ``dataset/cls``, ``dataset/train.txt``, ``dataset/val.txt``); ``out_dir``:
    where the PNGs go (default ``devkit/VOC2012/SegmentationClassAug``). Returns counts
    ``{"converted", "aug", "trainaug"}`` (9118 / 10582 on the real data).
    """
    voc = Path(devkit) / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    cls_dir = Path(sbd) / "dataset" / "cls"
    if not cls_dir.is_dir():
        raise FileNotFoundError(f"convert_voc_aug: SBD class folder not found: {cls_dir}")
    out = Path(out_dir) if out_dir is not None else voc / "SegmentationClassAug"
    # Read every list before writing anything, so a missing list fails fast.
    sbd_ids = _read_ids(Path(sbd) / "dataset" / "train.txt") + \
        _read_ids(Path(sbd) / "dataset" / "val.txt")
    voc_train, voc_val = _read_ids(sets / "train.txt"), _read_ids(sets / "val.txt")
    mats = sorted(cls_dir.glob("*.mat"))
    if not mats:
        raise DataError(f"convert_voc_aug: no .mat files in {cls_dir}")
    bar = Progress(len(mats), "voc-aug", enabled=progress)
    for m in mats:
        write_png_atomic(out / (m.stem + ".png"), sbd_mat_to_label(m))
        bar.step()
    bar.close()
    # mmseg's generate_aug_list is a set difference (unordered); sorted here for stable files.
    trainaug = sorted(set(voc_train + sbd_ids) - set(voc_val))
    aug = sorted(set(sbd_ids) - set(voc_train + voc_val))
    write_text_atomic(sets / "trainaug.txt", _lines(trainaug), make_parents=True)
    write_text_atomic(sets / "aug.txt", _lines(aug), make_parents=True)
    return {"converted": len(mats), "aug": len(aug), "trainaug": len(trainaug)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ocrnet.data.convert",
                                description="Prepare dataset annotations as mmsegmentation "
                                            "expects them.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cityscapes", help="gtFine polygons/labelIds -> labelTrainIds PNGs")
    c.add_argument("root", help="Cityscapes root (holds leftImg8bit/ and gtFine/)")
    c.add_argument("--gt-dir", default="gtFine", help="annotation folder (default gtFine)")
    c.add_argument("--source", choices=("auto", "json", "labelIds"), default="auto",
                   help="read *_polygons.json or *_labelIds.png (auto: json if present)")
    c.add_argument("--label-ids", action="store_true",
                   help="also write *_gtFine_labelIds.png from the json (json source only)")
    c.add_argument("--no-split-lists", action="store_true",
                   help="do not write train/val/test.txt into the root")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress count")
    v = sub.add_parser("voc-aug", help="SBD cls/*.mat -> SegmentationClassAug + aug.txt")
    v.add_argument("devkit", help="VOCdevkit folder (holds VOC2012/)")
    v.add_argument("sbd", help="SBD folder (holds dataset/cls, dataset/train.txt, val.txt)")
    v.add_argument("-o", "--out-dir", default=None,
                   help="PNG folder (default VOCdevkit/VOC2012/SegmentationClassAug)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress count")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter CLI; returns 0 on success, 1 on a data error (argparse exits 2 on
    usage errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "cityscapes":
            n = convert_cityscapes(args.root, args.gt_dir, args.source,
                                   split_lists=not args.no_split_lists,
                                   progress=not args.quiet, label_ids=args.label_ids)
            what = "*_labelTrainIds.png" + (" and *_labelIds.png" if args.label_ids else "")
            print(f"wrote {n} {what} files under {Path(args.root) / args.gt_dir}")
        else:
            counts = convert_voc_aug(args.devkit, args.sbd, args.out_dir,
                                     progress=not args.quiet)
            print(f"converted {counts['converted']} .mat files; aug.txt: {counts['aug']} ids, "
                  f"trainaug.txt: {counts['trainaug']} ids (10582 on the full SBD + VOC2012)")
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"ocrnet.data.convert: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
