"""OCRNet models (issue 4): parameter counts, configs, mmsegmentation fixture, checkpoints."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, shared_path

import ocrnet
from ocrnet.cli import main as cli_main
from ocrnet.models import build_segmentor, count_parameters, cross_entropy
from ocrnet.models.checkpoint import (CheckpointError, describe_state_dict,
                                      load_backbone_pretrained, read_checkpoint, save_checkpoint)

HR18S = "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"
FIXTURE = "mmseg_ocrnet_hr18s"
CKPT = "ocrnet_hr18s_cityscapes_randinit.pth"
TOL = 1e-4

TABLE = sorted(
    [f"ocrnet_{b}_4xb2-{i}k_cityscapes-512x1024" for b in ("hr18s", "hr18", "hr48")
     for i in (40, 80, 160)]
    + ["ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024",
       "ocrnet_r101-d8_8xb2-40k_cityscapes-512x1024",
       "ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024"]
    + [f"ocrnet_{b}_4xb4-{i}k_ade20k-512x512" for b in ("hr18s", "hr18", "hr48")
       for i in (80, 160)]
    + [f"ocrnet_{b}_4xb4-{i}k_voc12aug-512x512" for b in ("hr18s", "hr18", "hr48")
       for i in (20, 40)])


def _meta_model(name: str):
    with torch.device("meta"):
        return build_segmentor(name, init=False)


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed although loading failed"


# ---------------------------------------------------------------------------- configs, sizes

@pytest.mark.parametrize("name, params", [
    ("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", 6_378_496),
    ("ocrnet_hr18_4xb2-40k_cityscapes-512x1024", 12_080_036),
    ("ocrnet_hr48_4xb2-40k_cityscapes-512x1024", 70_371_446),
    ("ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024", 55_516_294),
    ("ocrnet_hr48_4xb4-80k_ade20k-512x512", 70_533_100),
])
def test_parameter_counts(name, params):
    assert count_parameters(_meta_model(name)) == params


def test_registry_has_the_published_table():
    assert ocrnet.list_configs() == TABLE
    classes = {"cityscapes": 19, "ade20k": 150, "voc12aug": 21}
    for name in TABLE:
        cfg = ocrnet.get_config(name)
        model = _meta_model(name)
        assert model.num_classes == cfg.model.num_classes == classes[cfg.data.dataset]
        assert model.decode_head[0].conv_seg.out_channels == cfg.model.num_classes
        assert cfg.model.align_corners is False and cfg.test.mode == "whole"
        gpus, batch = name.split("_")[2].split("-")[0].split("xb")
        assert (cfg.data.gpus, cfg.data.batch_per_gpu) == (int(gpus), int(batch))
        assert cfg.schedule.iterations == int(name.split("-")[-2].split("k")[0]) * 1000
        assert (cfg.schedule.momentum, cfg.schedule.weight_decay, cfg.schedule.power) == (
            0.9, 5e-4, 0.9)
        assert cfg.published is not None


def test_config_details():
    r101 = ocrnet.get_config("ocrnet_r101-d8_8xb2-40k_cityscapes-512x1024")
    assert (r101.schedule.lr, r101.schedule.min_lr, r101.data.total_batch) == (0.02, 2e-4, 16)
    assert (r101.model.aux_head.kernel_size, r101.model.aux_head.dropout_ratio) == (3, 0.1)
    hr = ocrnet.get_config("ocrnet_hr48_4xb4-160k_ade20k-512x512")
    assert (hr.schedule.lr, hr.schedule.min_lr, hr.data.crop_size) == (0.01, 1e-4, (512, 512))
    assert hr.model.ocr_head.in_channels == 720 and hr.data.reduce_zero_label
    # mmseg config paths are accepted; a Config passes through.
    assert ocrnet.get_config(f"configs/ocrnet/{HR18S}.py") is ocrnet.get_config(HR18S)
    assert ocrnet.get_config(hr) is hr


def test_unknown_config_lists_close_matches():
    with pytest.raises(ValueError, match="ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"):
        ocrnet.get_config("ocrnet_hr18s_4xb2-40k_cityscape-512x1024")
    with pytest.raises(ValueError, match="list_configs"):
        ocrnet.get_config("pspnet")


# ----------------------------------------------------------------------- small-input forward

@pytest.mark.parametrize("name, size, stride", [
    (HR18S, (70, 90), 4),  # odd branch sizes: exercises the fuse layers' final resize
    ("ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024", (65, 65), 8),
])
def test_forward_shapes_fused_matches_reference(name, size, stride, one_thread):
    model = build_segmentor(name).eval()
    img = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model.extract_features(img)
        aux, ocr = model.decode(feats)
        model.fused = False
        _, ocr_ref = model.decode(feats)
        model.fused = True
        out = model(img)
    h, w = -(-size[0] // stride), -(-size[1] // stride)
    assert aux.shape == ocr.shape == (1, 19, h, w)
    assert out.shape == (1, 19, *size)
    assert rel_err(ocr, ocr_ref) <= TOL


def test_loss_semantics(one_thread):
    model = build_segmentor(HR18S)
    img = torch.randn(2, 3, 32, 48)
    labels = torch.randint(0, 19, (2, 32, 48))
    labels[:, :8] = 255
    losses = model.loss(img, labels)
    assert set(losses) == {"loss_aux", "loss_ocr", "loss"}
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad
    losses["loss"].backward()
    assert model.backbone.conv1.weight.grad is not None
    # mmseg's default reduction: the ignored pixels count in the denominator.
    logits = torch.randn(2, 19, 8, 12)
    up = F.interpolate(logits, size=(32, 48), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, ignore_index=255, reduction="none")
    torch.testing.assert_close(cross_entropy(logits, labels), per_pixel.sum() / labels.numel())
    torch.testing.assert_close(cross_entropy(logits, labels, avg_non_ignore=True),
                               F.cross_entropy(up, labels, ignore_index=255))


# ------------------------------------------------------------------- mmsegmentation fixture

@pytest.fixture(scope="module")
def fixture_run():
    """Load the mmseg checkpoint, run the backbone once and both head modes once."""
    root = shared_path("fixtures", FIXTURE)
    info = json.loads((root / "fixture.json").read_text())
    model = ocrnet.init_model(HR18S, root / CKPT, fused=False)
    ref = {name: torch.from_numpy(np.load(root / f))
           for f, name in [(f, f.split("_1x")[0]) for f in info["files"] if f.endswith(".npy")]
           if (root / f).exists()}
    out = {}
    with torch.no_grad():
        out["feats"] = model.extract_features(ref["input"])
        for fused in (False, True):
            model.fused = fused
            out[fused] = model.decode(out["feats"])
    return model, info, ref, out


def test_fixture_backbone_features(fixture_run):
    _, _, ref, out = fixture_run
    for i, feat in enumerate(out["feats"]):
        assert feat.shape == ref[f"backbone_feat{i}"].shape
        assert rel_err(feat, ref[f"backbone_feat{i}"]) <= TOL, f"branch {i}"


@pytest.mark.parametrize("fused", [False, True])
def test_fixture_logits(fixture_run, fused):
    _, info, ref, out = fixture_run
    aux, ocr = out[fused]
    assert rel_err(aux, ref["aux_logits"]) <= TOL
    assert rel_err(ocr, ref["ocr_logits"]) <= TOL
    # Full resolution, as model(img) returns it: compare with the float64 statistics.
    full = F.interpolate(ocr, size=(512, 1024), mode="bilinear", align_corners=False).double()
    stats = info["checksums"]["logits_fp32"]
    scale = max(abs(stats["min"]), abs(stats["max"]))
    for key, value in [("mean", full.mean()), ("std", full.std()), ("min", full.min()),
                       ("max", full.max())]:
        assert abs(value.item() - stats[key]) <= TOL * scale, key
    hist = torch.bincount(full.argmax(1).flatten(), minlength=19)
    # Near-ties may flip between BLAS builds; allow 0.01% of the pixels to move.
    assert (hist - torch.tensor(info["argmax_hist"])).abs().sum() <= 512 * 1024 * 1e-4


def test_fixture_state_dict_keys(fixture_run):
    model, info, _, _ = fixture_run
    sd, meta = read_checkpoint(shared_path("fixtures", FIXTURE, CKPT))
    assert len(sd) == info["checkpoint"]["keys"] == len(model.state_dict())
    assert count_parameters(model) == info["checkpoint"]["params"]
    assert meta["config"] == HR18S
    assert describe_state_dict(sd) == "HRNetV2p-W18-Small, 19 classes"
    assert not model.training


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def mmseg_ckpt():
    return shared_path("fixtures", FIXTURE, CKPT)


def test_module_prefix_and_bare_state_dict(tmp_path):
    src = build_segmentor(HR18S)
    sd = src.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    torch.save(dict(sd), tmp_path / "bare.pth")
    for f in ("ddp.pth", "bare.pth"):
        dst = build_segmentor(HR18S)
        ocrnet.load_checkpoint(dst, tmp_path / f)
        _assert_same_state(dst, sd)


def test_corrupt_and_truncated_files(tmp_path, mmseg_ckpt):
    model = build_segmentor(HR18S)
    before = _state_copy(model)
    data = mmseg_ckpt.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 100)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("truncated.pth", "garbage.pth", "empty.pth"):
        with pytest.raises(CheckpointError, match=name):
            ocrnet.load_checkpoint(model, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ocrnet.load_checkpoint(model, tmp_path / "missing.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "not_tensors.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        ocrnet.load_checkpoint(model, tmp_path / "not_tensors.pth")
    _assert_same_state(model, before)


def test_wrong_class_count(tmp_path, mmseg_ckpt):
    sd, _ = read_checkpoint(mmseg_ckpt)
    for head in ("decode_head.0", "decode_head.1"):
        w = sd[f"{head}.conv_seg.weight"]
        sd[f"{head}.conv_seg.weight"] = torch.zeros(21, *w.shape[1:])
        sd[f"{head}.conv_seg.bias"] = torch.zeros(21)
    torch.save({"state_dict": sd}, tmp_path / "voc.pth")
    model = build_segmentor(HR18S)
    before = _state_copy(model)
    with pytest.raises(CheckpointError) as err:
        ocrnet.load_checkpoint(model, tmp_path / "voc.pth")
    msg = str(err.value)
    assert "21 classes" in msg and "19 classes" in msg and "conv_seg.weight" in msg
    assert "voc.pth" in msg and "nothing was loaded" in msg
    _assert_same_state(model, before)


def test_wrong_architecture(mmseg_ckpt):
    model = build_segmentor("ocrnet_hr18_4xb2-40k_cityscapes-512x1024")
    before = _state_copy(model)
    with pytest.raises(CheckpointError, match="checkpoint is HRNetV2p-W18-Small.*model is "
                                              "HRNetV2p-W18,") as err:
        ocrnet.load_checkpoint(model, mmseg_ckpt)
    assert "missing keys" in str(err.value)
    _assert_same_state(model, before)
    r101 = _meta_model("ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024")
    with pytest.raises(CheckpointError, match="model is ResNetV1c-101, 19 classes"):
        ocrnet.load_checkpoint(r101, mmseg_ckpt)


def test_convert_round_trip(tmp_path, mmseg_ckpt):
    dst = tmp_path / "ours.pth"
    assert cli_main(["convert", str(mmseg_ckpt), str(dst)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ours.pth"]  # no temp file left behind
    raw = torch.load(dst, weights_only=True)
    assert raw["format"] == "ocrnet" and raw["meta"]["config"] == HR18S
    ref, _ = read_checkpoint(mmseg_ckpt)
    model = build_segmentor(HR18S)
    ocrnet.load_checkpoint(model, dst)
    _assert_same_state(model, ref)
    # ours -> ours is stable; a wrong --config is refused and leaves no file.
    again = ocrnet.convert_checkpoint(dst, tmp_path / "again.pth")
    assert read_checkpoint(again)[0].keys() == ref.keys()
    bad = tmp_path / "bad.pth"
    assert cli_main(["convert", str(mmseg_ckpt), str(bad), "--config",
                     "ocrnet_hr48_4xb2-40k_cityscapes-512x1024"]) == 1
    assert not bad.exists()


def test_save_checkpoint_overwrites_atomically(tmp_path):
    model = build_segmentor(HR18S)
    path = save_checkpoint(model, tmp_path / "m.pth", {"note": "first"})
    path = save_checkpoint(model, path, {"note": "second"})
    assert read_checkpoint(path)[1]["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_backbone_imagenet_init(tmp_path, mmseg_ckpt):
    sd, _ = read_checkpoint(mmseg_ckpt)
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {"incre_modules.0.0.conv1.weight": torch.zeros(32, 18, 1, 1),
            "downsamp_modules.0.0.weight": torch.zeros(256, 128, 3, 3),
            "final_layer.0.weight": torch.zeros(2048, 1024, 1, 1),
            "classifier.weight": torch.zeros(1000, 2048), "classifier.bias": torch.zeros(1000)}
    torch.save({**bb, **head}, tmp_path / "hrnetv2_w18_small_imagenet.pth")
    model = build_segmentor(HR18S)
    heads_before = _state_copy(model.decode_head)
    ignored = load_backbone_pretrained(model, tmp_path / "hrnetv2_w18_small_imagenet.pth")
    assert sorted(ignored) == sorted(head)
    _assert_same_state(model.backbone, bb)
    _assert_same_state(model.decode_head, heads_before)
    # A ResNet file does not fit an HRNet: refused, nothing loaded.
    r101 = _meta_model("ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024")
    torch.save({k: torch.zeros(v.shape) for k, v in r101.backbone.state_dict().items()
                if k.startswith(("stem.", "layer1.0."))}, tmp_path / "resnet101_v1c.pth")
    before = _state_copy(model)
    with pytest.raises(CheckpointError, match="resnet101_v1c.pth.*does not fit HRNet"):
        load_backbone_pretrained(model, tmp_path / "resnet101_v1c.pth")
    _assert_same_state(model, before)


def _save_with_fake_classes(path, module: str, obj_factory):
    """torch.save an object of a class living in a (temporarily faked) module ``module``."""
    parts = module.split(".")
    fakes = {".".join(parts[:i]): types.ModuleType(".".join(parts[:i]))
             for i in range(1, len(parts) + 1)}
    cls = type("HistoryBuffer", (), {"__module__": module})
    fakes[module].HistoryBuffer = cls
    sys.modules.update(fakes)
    try:
        torch.save(obj_factory(cls), path)
    finally:
        for name in fakes:
            sys.modules.pop(name, None)


def test_mmengine_training_checkpoint(tmp_path):
    """mmseg 1.x checkpoints carry runner state (mmengine objects, numpy arrays)."""
    model = build_segmentor(HR18S)

    def payload(cls):
        buf = cls()
        buf._log_history = np.array([0.5, 0.25])
        return {"state_dict": model.state_dict(), "meta": {"iter": np.int64(40000)},
                "message_hub": {"log_scalars": {"train/lr": buf}}}

    _save_with_fake_classes(tmp_path / "mm1x.pth", "mmengine.logging.history_buffer", payload)
    dst = build_segmentor(HR18S)
    ocrnet.load_checkpoint(dst, tmp_path / "mm1x.pth")
    _assert_same_state(dst, model.state_dict())
    # Objects of any other package are refused, by name.
    _save_with_fake_classes(tmp_path / "other.pth", "somepkg.evil", payload)
    with pytest.raises(CheckpointError, match="somepkg.evil.HistoryBuffer"):
        ocrnet.load_checkpoint(dst, tmp_path / "other.pth")


def test_synthetic_config_numbers_match_the_models_and_the_data():
    # configs sit below models and data in the import order, so they hold these numbers.
    from ocrnet.configs.synthetic import HRNET_BASE_WIDTH, SYNTHETIC_NUM_CLASSES
    from ocrnet.data import SYNTHETIC_CLASSES
    from ocrnet.models.hrnet import HRNET_ARCHS, hrnet_width

    assert SYNTHETIC_NUM_CLASSES == len(SYNTHETIC_CLASSES)
    assert HRNET_BASE_WIDTH == {arch: hrnet_width(arch) for arch in HRNET_ARCHS}


def test_hrnet_fuse_sums_in_place_without_autograd_give_the_same_bits():
    """HRModule's fuse layers add in place when autograd is off: the same sums in the same
    order (bit for bit), the branch outputs the other rows read left as they were."""
    from ocrnet.models.hrnet import HRModule
    from ocrnet.models.resnet import BasicBlock
    torch.manual_seed(0)
    module = HRModule(BasicBlock, (1, 1, 1), [4, 8, 16], (4, 8, 16)).eval()
    xs = [torch.randn(2, c, 17 // s + 1, 23 // s + 1) for c, s in ((4, 1), (8, 2), (16, 4))]
    kept = [x.clone() for x in xs]
    with torch.enable_grad():
        want = module([x.requires_grad_() for x in [x.clone() for x in xs]])
    with torch.no_grad():
        got = module(xs)
    for g, w in zip(got, want):
        assert torch.equal(g, w.detach())
        assert (g == 0).any() and (g > 0).any()
    for x, k in zip(xs, kept):
        assert torch.equal(x, k)
