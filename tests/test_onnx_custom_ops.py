"""ONNX export with the OCR head kept as the ``com.ocrkernels`` ``OCRHead`` node, run in ONNX
Runtime by ``ocrkernels.onnxruntime_library()`` (onnxruntime-extensions' Python operators on the
fused kernels): the same logits as PyTorch and as the plain export, both exporters, dynamic
shapes, and ``ocrnet export --fused-ops``."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from conftest import rel_err, run_models_bench
from torch import nn

import ocrkernels
from ocrkernels import OCRHead, onnx_ops
from test_modules import randomise_batchnorm
from test_onnx_export import TINY, _cli, _need_onnx_runtime, _run, _tiny_model

TOL = 1e-4


@pytest.fixture(autouse=True)
def _need_onnx_runtime_and_extensions():
    _need_onnx_runtime()


def _run_fused(data: bytes, *inputs: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(ocrkernels.onnxruntime_library())
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])


def _custom_nodes(data: bytes) -> list[tuple[str, str, list[str]]]:
    import onnx

    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    return [(n.domain, n.op_type, [a.name for a in n.attribute])
            for n in model.graph.node if n.domain not in ("", "ai.onnx")]


class _Foreign(nn.Module):
    """A user's segmenter with the drop-in head: a stem, a coarse classifier, OCRHead."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU())
        self.coarse = nn.Conv2d(24, 5, 1)
        self.head = OCRHead(24, 5, channels=32, ocr_channels=16, scale=0.5, fused=True)

    def forward(self, x):
        feats = self.stem(x)
        return self.head(feats, self.coarse(feats))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_foreign_model_keeps_the_head_as_one_node(dynamo):
    torch.manual_seed(0)
    model = randomise_batchnorm(_Foreign(), mean_scale=0.2, bias_scale=0.2).eval()
    x = torch.randn(2, 3, 13, 17)
    with torch.no_grad():
        want = model(x)
    custom = onnx_ops.with_custom_op_heads(model)
    with torch.no_grad():
        if dynamo:
            program = torch.onnx.export(custom, (x,), dynamo=True, verbose=False,
                                        custom_translation_table=onnx_ops.translation_table())
            data = program.model_proto.SerializeToString()
        else:
            onnx_ops.register_torchscript_symbolic()
            buffer = io.BytesIO()
            torch.onnx.export(custom, (x,), buffer, dynamo=False, opset_version=18)
            data = buffer.getvalue()
    assert _custom_nodes(data) == [("com.ocrkernels", "OCRHead", ["scale"])]
    assert rel_err(_run_fused(data, x), want) <= TOL


def test_without_the_library_onnx_runtime_names_the_missing_operator():
    import onnxruntime as ort

    custom = onnx_ops.with_custom_op_heads(_Foreign().eval())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        data = torch.onnx.export(custom, (x,), dynamo=True, verbose=False,
                                 custom_translation_table=onnx_ops.translation_table()
                                 ).model_proto.SerializeToString()
    with pytest.raises(Exception, match="OCRHead"):
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_library_registers_once():
    first = ocrkernels.onnxruntime_library()
    assert os.path.isfile(first) and ocrkernels.onnxruntime_library() == first


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_ocrnet_fused_ops_export_equals_the_plain_export(tmp_path, dynamic):
    from ocrnet.inference.export import onnx_bytes

    model = _tiny_model()
    shape = (64, 96) if dynamic else (32, 64)
    plain, _ = onnx_bytes(model, shape, dynamic=dynamic)
    fused, exported = onnx_bytes(model, shape, dynamic=dynamic, fused_ops=True)
    assert _custom_nodes(plain) == []
    assert [n[:2] for n in _custom_nodes(fused)] == [("com.ocrkernels", "OCRHead")]
    # With dynamic shapes another batch and size than the example's.
    img = torch.randn(*((3, 3, 96, 160) if dynamic else (1, 3, 32, 64)),
                      generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = exported(img)
    got = _run_fused(fused, img)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL
    (tmp_path / "plain.onnx").write_bytes(plain)
    assert rel_err(got, _run(tmp_path / "plain.onnx", img)) <= TOL


def test_export_command_fused_ops(tmp_path):
    out = tmp_path / "fused.onnx"
    code, err = _cli(TINY, "--out", str(out), "--shape", "32", "64", "--fused-ops",
                     "--output", "argmax")
    assert code == 0, err
    assert "ONNX Runtime vs PyTorch at (1, 3, 32, 64): differing pixels" in err
    assert [n[:2] for n in _custom_nodes(out.read_bytes())] == [("com.ocrkernels", "OCRHead")]
    got = _run_fused(out.read_bytes(), torch.randn(1, 3, 32, 64))
    assert got.shape == (1, 32, 64) and got.dtype == torch.int64
    code, err = _cli(TINY, "--out", str(tmp_path / "m.pt2"), "--format", "pt2", "--fused-ops")
    assert code == 1 and "--fused-ops is for --format onnx" in err
    assert not (tmp_path / "m.pt2").exists()


def test_results_are_arrays_for_the_hook():
    """The wrapper the Python operator returns reads as the array (shape, flatten().tolist(),
    __array__), so the hook copies one buffer instead of building a list of floats."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = onnx_ops._Result(a.T)
    assert r.shape == (3, 2) and r.flatten().tolist() is r.array
    assert r.array.flags["C_CONTIGUOUS"] and np.array_equal(np.asarray(r), a.T)


def test_models_bench_times_the_fused_onnx_runtime_row(tmp_path):
    """bench/models.py with the onnxruntime peer adds our deployment row, ``ort-fused``, and
    its ratio to plain ONNX Runtime in the same run."""
    proc, rows = run_models_bench(tmp_path, "--images", "1", "--peers", "onnxruntime",
                                  timeout=600)
    rows = {r["path"]: r for r in rows}
    assert list(rows) == ["eager", "fast", "onnxruntime", "ort-fused"]
    fused = rows["ort-fused"]
    assert fused["rel_err_vs_eager"] <= TOL and fused["argmax_agreement"] >= 0.999
    assert fused["speedup_vs_onnxruntime"] == pytest.approx(
        fused["fps"] / rows["onnxruntime"]["fps"])
    # Ours, not a peer: the best peer is the plain ONNX Runtime.
    assert fused["speedup_vs_best_peer"] == pytest.approx(fused["speedup_vs_onnxruntime"])
    assert "ort-fused (ours): ONNX Runtime" in proc.stdout
    assert "| vs ORT |" in proc.stdout
