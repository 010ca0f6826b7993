"""ONNX export of models that hold the fused OCR kernels: while ``torch.onnx.export`` runs, every
``ocrkernels`` op and fast-path module takes its plain-PyTorch path (standard ONNX operators),
so the file runs in ONNX Runtime and gives PyTorch's numbers, with either exporter."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import rel_err, shared_path
from torch import nn

import ocrkernels
import ocrnet
from ocrkernels import OCRHead, backends
from ocrnet.configs import SYNTHETIC_CONFIGS
from ocrnet.models import build_segmentor
from test_modules import randomise_batchnorm

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
TOL = 1e-4


def _need_onnx_runtime():
    """ONNX Runtime and onnxscript are test dependencies (make setup installs them): in CI
    their absence fails; in a user's environment without them the tests skip."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript", "onnxruntime_extensions")
               if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} missing: CI installs them with make setup")
        pytest.skip(f"{', '.join(missing)} not installed (pip install onnxruntime onnxscript "
                    "onnxruntime-extensions)")


def _export(model: nn.Module, args: tuple, path, dynamo: bool, **kwargs) -> None:
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, args, str(path), dynamo=True, verbose=False, **kwargs)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, **kwargs)


def _run(path, *inputs: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
    return torch.from_numpy(np.asarray(out))


def _ops_in(path) -> set[str]:
    import onnx

    return {f"{n.domain}::{n.op_type}" if n.domain else n.op_type
            for n in onnx.load(str(path)).graph.node}


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_segmentor(SYNTHETIC_CONFIGS[TINY], fused=True)
    return randomise_batchnorm(model, mean_scale=0.2, bias_scale=0.2).eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("fast_path", [False, True], ids=["fused", "fast_path"])
def test_fused_ocrnet_exports_and_matches_in_onnx_runtime(tmp_path, dynamo, fast_path):
    _need_onnx_runtime()
    model = _tiny_model()
    if fast_path:
        model = ocrnet.prepare_for_inference(model)
    img = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(img)
    path = tmp_path / "model.onnx"
    _export(model, (img,), path, dynamo)
    ops = _ops_in(path)
    assert not any(op.startswith(("ocrkernels", "mkldnn")) for op in ops), ops
    assert "Softmax" in ops or "Exp" in ops  # the gather's and the attention's softmaxes
    got = _run(path, img)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL
    # Exporting left the model on its kernels.
    assert not backends.exporting_onnx()
    with torch.no_grad():
        assert torch.equal(model(img), want)


class _ForeignSegmenter(nn.Module):
    """A user's model: its own stem and coarse classifier, our drop-in head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.coarse = nn.Conv2d(24, 5, 1)
        self.head = OCRHead(24, 5, channels=32, ocr_channels=16, fused=True)

    def forward(self, x):
        feats = self.stem(x)
        return self.head(feats, self.coarse(feats))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_foreign_model_with_the_drop_in_head_exports(tmp_path, dynamo):
    _need_onnx_runtime()
    torch.manual_seed(0)
    model = randomise_batchnorm(_ForeignSegmenter(), mean_scale=0.2, bias_scale=0.2).eval()
    x = torch.randn(2, 3, 13, 17)
    with torch.no_grad():
        want = model(x)
        model.head.fused = False
        reference = model(x)
        model.head.fused = True
    assert rel_err(want, reference) <= 1e-5
    path = tmp_path / "foreign.onnx"
    _export(model, (x,), path, dynamo)
    assert rel_err(_run(path, x), want) <= TOL


def test_dynamic_height_and_width(tmp_path):
    _need_onnx_runtime()
    model = ocrnet.prepare_for_inference(_tiny_model())
    img = torch.randn(2, 3, 64, 96)
    # Multiples of 32 (the backbone's stride), batch, height and width free.
    batch = torch.export.Dim("batch", min=1, max=8)
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    path = tmp_path / "dynamic.onnx"
    _export(model, (img,), path, dynamo=True,
            dynamic_shapes={"img": {0: batch, 2: 32 * h, 3: 32 * w}})
    other = torch.randn(3, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(other)
    got = _run(path, other)
    assert got.shape == (3, want.shape[1], 96, 160)
    assert rel_err(got, want) <= TOL


def _cli(*args: str) -> tuple[int, str]:
    from ocrnet.cli import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", *args])
    return code, err.getvalue()


@pytest.mark.parametrize("fused_ops", [False, True], ids=["plain", "fused_ops"])
def test_export_command_on_the_mmseg_fixture_gives_mmsegs_logits(tmp_path, fused_ops):
    """`ocrnet export` of mmsegmentation's own hr18s checkpoint: ONNX Runtime's logits for the
    fixture image are mmsegmentation's, with standard operators only and with the OCR head as
    ocrkernels' custom op (served by ocrkernels.onnxruntime_library)."""
    _need_onnx_runtime()
    folder = shared_path("fixtures", "mmseg_ocrnet_hr18s")
    out = tmp_path / "hr18s.onnx"
    checkpoint = str(folder / "ocrnet_hr18s_cityscapes_randinit.pth")
    config = "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024"
    # Both ways of naming the weights: CHECKPOINT --config CONFIG, and CONFIG CHECKPOINT.
    names = [config, checkpoint] if fused_ops else [checkpoint, "--config", config]
    code, err = _cli(*names, "--out", str(out), *(["--fused-ops"] if fused_ops else []))
    assert code == 0, err
    assert "ONNX Runtime vs PyTorch at (1, 3, 512, 1024): relative error" in err
    img = torch.from_numpy(np.load(folder / "input_1x3x512x1024.npy"))
    if fused_ops:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.register_custom_ops_library(ocrkernels.onnxruntime_library())
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"img": img.numpy()})[0])
    else:
        got = _run(out, img)
    coarse = torch.from_numpy(np.load(folder / "ocr_logits_1x19x128x256.npy"))
    want = torch.nn.functional.interpolate(coarse, size=(512, 1024), mode="bilinear",
                                           align_corners=False)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("output", ["softmax", "argmax"])
def test_export_command_outputs(tmp_path, output):
    _need_onnx_runtime()
    out = tmp_path / f"{output}.onnx"
    code, err = _cli(TINY, "--out", str(out), "--shape", "32", "64", "--output", output,
                     "--exporter", "torchscript")
    assert code == 0, err
    assert "has random weights" in err
    img = torch.randn(1, 3, 32, 64)
    got = _run(out, img)
    if output == "softmax":
        assert got.shape == (1, SYNTHETIC_CONFIGS[TINY].model.num_classes, 32, 64)
        assert torch.allclose(got.sum(1), torch.ones(1, 32, 64), atol=1e-5)
    else:
        assert got.shape == (1, 32, 64) and got.dtype == torch.int64


def test_export_command_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    _need_onnx_runtime()
    old = tmp_path / "model.onnx"
    old.write_bytes(b"the user's file")
    for args, message in [
        (["--out", str(tmp_path / "missing" / "m.onnx")], "does not exist"),
        (["--out", str(tmp_path / "m.txt")], "must name a .onnx file"),
        (["--out", str(old), "--dynamic", "--shape", "50", "64"], "multiples of 32"),
        (["--out", str(old), "--dynamic", "--exporter", "torchscript", "--shape", "64", "64"],
         "dynamo exporter"),
        (["x.pth", "--config", TINY, "--out", str(old)], "not both"),
    ]:
        code, err = _cli(TINY, *args)
        assert code == 1
        assert err.strip().splitlines()[-1].startswith("ocrnet export: error:")
        assert message in err
    assert old.read_bytes() == b"the user's file"


_LOAD_PT2 = """
import sys, torch
import ocrkernels  # registers the ops the package calls
runner = torch._inductor.aoti_load_package(sys.argv[1])
with torch.no_grad():
    torch.save(runner(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_export_command_pt2_package_keeps_the_kernels_and_runs_elsewhere(tmp_path):
    """--format pt2: an AOTInductor package of the fast path whose graph keeps the ocrkernels
    ops; a fresh process loads it and gives PyTorch's logits."""
    import subprocess
    import sys

    model = _tiny_model()
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "tiny.pt2"
    code, err = _cli(str(checkpoint), "--config", TINY, "--format", "pt2", "--out", str(out),
                     "--shape", "32", "64")
    assert code == 0, err
    assert "the package vs PyTorch at (1, 3, 32, 64): relative error" in err
    img = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(5))
    torch.save(img, tmp_path / "img.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_PT2, str(out), str(tmp_path / "img.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        want = ocrnet.prepare_for_inference(model)(img)
    assert rel_err(torch.load(tmp_path / "out.pt"), want) <= 1e-5
    # The package's graph calls the fused kernels (not their reference decomposition).
    with torch.no_grad():
        program = torch.export.export(ocrnet.prepare_for_inference(model, channels_last=False),
                                      (img,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"ocrkernels.spatial_gather.default",
            "ocrkernels.object_attention_eval.default"} <= targets


@pytest.mark.parametrize("config", [
    "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", "ocrnet_hr18_4xb2-40k_cityscapes-512x1024",
    "ocrnet_hr48_4xb2-40k_cityscapes-512x1024", "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024"])
def test_every_published_architecture_exports(tmp_path, config):
    """Each backbone of the published table (random weights, a small image) on its fast path:
    ONNX Runtime gives PyTorch's logits."""
    _need_onnx_runtime()
    torch.manual_seed(0)
    model = randomise_batchnorm(build_segmentor(config, fused=True), mean_scale=0.2,
                                bias_scale=0.2).eval()
    img = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    from ocrnet.inference.export import onnx_bytes

    data, exported = onnx_bytes(model, (64, 128))
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with torch.no_grad():
        want = exported(img)
    assert rel_err(_run(path, img), want) <= TOL
