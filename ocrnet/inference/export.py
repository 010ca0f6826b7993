"""Export of an OCRNet for deployment, behind ``ocrnet export``: ONNX (:func:`onnx_bytes`) and
AOTInductor packages (:func:`pt2_bytes`), as bytes that the command checks before it writes
them.

The exported graph takes the normalised float32 (N, 3, H, W) image, as ``model(img)`` takes it
(mean/std of :func:`ocrnet.normalise` already applied), and gives, at the input's resolution:

* ``logits``: (N, K, H, W) float32 class scores;
* ``softmax``: (N, K, H, W) float32 class probabilities;
* ``argmax``: (N, H, W) int64 class ids.

The model is the inference copy of :func:`ocrnet.prepare_for_inference` (BatchNorm folded). While
``torch.onnx.export`` runs, every ``ocrkernels`` op takes its plain-PyTorch path
(:func:`ocrkernels.backends.exporting_onnx`), so the file holds standard ONNX operators only and
runs in any ONNX runtime. The AOTInductor package (``.pt2``) keeps the ``ocrkernels`` ops
(``torch.export`` graph, compiled ahead of time): load it with
``torch._inductor.aoti_load_package`` after ``import ocrkernels``, which registers them. With
``dynamic``, batch, height and width are free (height and width multiples of
:data:`SIZE_MULTIPLE`).

With ``fused_ops``, the ONNX file keeps the OCR head as one ``com.ocrkernels`` ``OCRHead`` node
(:mod:`ocrkernels.onnx_ops`) on its folded parameters, the rest in standard operators: ONNX
Runtime runs it with the fused kernels once the session options register
:func:`ocrkernels.onnxruntime_library` (``pip install onnxruntime-extensions``).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ocrkernels import onnx_ops

from ..models.segmentor import OCRNet
from .fastpath import prepare_for_inference

__all__ = ["OUTPUTS", "SIZE_MULTIPLE", "ExportedOCRNet", "check_with_onnxruntime",
           "check_pt2", "onnx_bytes", "pt2_bytes"]

OUTPUTS = ("logits", "softmax", "argmax")
# Height and width of a dynamic export: multiples of the backbone's largest stride (HRNet's
# fourth branch; ResNet-D8 needs 8), where every resize is exact and no size is baked in.
SIZE_MULTIPLE = 32
OPSET = 18


class ExportedOCRNet(nn.Module):
    """``model`` followed by the chosen output: (N, 3, H, W) -> logits, softmax or argmax."""

    def __init__(self, model: nn.Module, output: str = "logits"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"export: output must be one of {', '.join(OUTPUTS)}, got "
                             f"{output!r}")
        self.model = model
        self.output = output

    def forward(self, img: Tensor) -> Tensor:
        logits = self.model(img)
        if self.output == "softmax":
            return logits.softmax(dim=1)
        if self.output == "argmax":
            return logits.argmax(dim=1)
        return logits


def onnx_bytes(model: OCRNet, shape: tuple[int, int], *, dynamic: bool = False,
               output: str = "logits", exporter: str = "dynamo", fused_ops: bool = False
               ) -> tuple[bytes, ExportedOCRNet]:
    """``model`` (eval mode, any device; exported on the CPU) as a serialised ONNX model.

    Args:
        model: an :class:`~ocrnet.models.segmentor.OCRNet` (its weights are not modified).
        shape: (H, W) of the example image; with ``dynamic`` any multiple of
            :data:`SIZE_MULTIPLE` (both), else the one size the file takes.
        dynamic: free batch, height and width (``dynamo`` exporter only).
        output: ``logits``, ``softmax`` or ``argmax`` (see the module docstring).
        exporter: ``dynamo`` (``torch.onnx.export(dynamo=True)``, through onnxscript) or
            ``torchscript`` (the older exporter); opset :data:`OPSET`.
        fused_ops: keep the OCR head as the ``com.ocrkernels`` ``OCRHead`` node (see the
            module docstring); the exported module then runs that node's op too.

    Returns:
        (the ONNX model's bytes, the exported module: the prepared model and its output, on the
        CPU, for comparisons).
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"export: exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    if dynamic and exporter != "dynamo":
        raise ValueError("export: dynamic shapes need the dynamo exporter")
    wrapped, img, dynamic_shapes = _prepare(model, shape, dynamic, output, fused_ops)
    kwargs = {} if dynamic_shapes is None else {"dynamic_shapes": dynamic_shapes}
    if fused_ops and exporter == "dynamo":
        kwargs["custom_translation_table"] = onnx_ops.translation_table()
    elif fused_ops:
        onnx_ops.register_torchscript_symbolic(OPSET)
    with torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(wrapped, (img,), None, dynamo=True, opset_version=OPSET,
                                        input_names=["img"], output_names=[output],
                                        verbose=False, **kwargs)
            data = program.model_proto.SerializeToString()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(wrapped, (img,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["img"], output_names=[output])
            data = buffer.getvalue()
    return data, wrapped


def pt2_bytes(model: OCRNet, shape: tuple[int, int], *, dynamic: bool = False,
              output: str = "logits") -> tuple[bytes, ExportedOCRNet]:
    """``model`` as an AOTInductor package: ``torch.export`` of the prepared model (its
    ``ocrkernels`` ops kept), compiled ahead of time for this machine's CPU by
    ``torch._inductor.aoti_compile_and_package`` (a C++ compiler must be installed; a minute
    or more). Arguments and return value as :func:`onnx_bytes`."""
    wrapped, img, dynamic_shapes = _prepare(model, shape, dynamic, output)
    with torch.no_grad():
        program = torch.export.export(wrapped, (img,), dynamic_shapes=dynamic_shapes)
        with tempfile.TemporaryDirectory() as folder:
            package = Path(folder) / "model.pt2"
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
            return package.read_bytes(), wrapped


def check_pt2(package: bytes, module: nn.Module, img: Tensor) -> float:
    """Load the AOTInductor ``package`` (bytes), run it on ``img`` and compare with
    ``module(img)``, as :func:`check_with_onnxruntime`."""
    import ocrkernels  # noqa: F401 -- registers the ops the package calls

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt2"
        path.write_bytes(package)
        runner = torch._inductor.aoti_load_package(str(path))
        with torch.no_grad():
            got = runner(img)
    return _compare(got, module, img, "the package")


def _prepare(model: OCRNet, shape: tuple[int, int], dynamic: bool, output: str,
             fused_ops: bool = False) -> tuple[ExportedOCRNet, Tensor, dict | None]:
    """The exported module, its example image and its dynamic shapes (or None)."""
    if not isinstance(model, OCRNet):
        raise TypeError(f"export: model must be an ocrnet OCRNet, got {type(model).__name__}")
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"export: shape must be positive, got {h}x{w}")
    if dynamic:
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h < 2 * SIZE_MULTIPLE \
                or w < 2 * SIZE_MULTIPLE:
            raise ValueError(f"export: with dynamic shapes, H and W must be multiples of "
                             f"{SIZE_MULTIPLE} and at least {2 * SIZE_MULTIPLE}, got {h}x{w}")
    prepared = prepare_for_inference(model, channels_last=False, keep_memory=False).cpu()
    if fused_ops:  # the OCR head as one op on its folded parameters
        prepared.decode_head[1] = onnx_ops.CustomOpHead(prepared.ocr_head)
    wrapped = ExportedOCRNet(prepared, output).eval()
    # A dynamic batch needs an example of 2: torch.export specialises sizes of 0 and 1.
    img = torch.randn(2 if dynamic else 1, 3, h, w, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = {"img": {0: dim("batch", min=1, max=1024),
                                  2: SIZE_MULTIPLE * dim("height", min=2, max=1024),
                                  3: SIZE_MULTIPLE * dim("width", min=2, max=1024)}}
    return wrapped, img, dynamic_shapes


def check_with_onnxruntime(onnx_model: bytes | str | os.PathLike, module: nn.Module,
                           img: Tensor, fused_ops: bool = False) -> float | None:
    """Run ``onnx_model`` (bytes or a file) once in ONNX Runtime (CPU) on ``img``, compare with
    ``module(img)``: the relative error (max |diff| / max |torch|) for float outputs, the
    share of differing pixels for argmax. With ``fused_ops``, the session serves the
    ``com.ocrkernels`` nodes (:func:`ocrkernels.onnxruntime_library`). None when onnxruntime
    (or, with ``fused_ops``, onnxruntime-extensions) is not installed."""
    try:
        import onnxruntime as ort

        library = onnx_ops.onnxruntime_library() if fused_ops else None
    except ImportError:
        return None
    if not isinstance(onnx_model, bytes):
        onnx_model = str(onnx_model)
    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: img.numpy()})[0])
    return _compare(got, module, img, "ONNX Runtime")


def _compare(got: Tensor, module: nn.Module, img: Tensor, runner: str) -> float:
    with torch.no_grad():
        want = module(img)
    if got.shape != want.shape:
        raise ValueError(f"export: {runner} gave shape {tuple(got.shape)}, PyTorch "
                         f"{tuple(want.shape)}")
    if not want.is_floating_point():
        return (got != want).double().mean().item()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
