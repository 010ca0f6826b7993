"""The OCR head as one custom ONNX node, and ONNX Runtime kernels for it.

A plain ONNX export (``torch.onnx.export``) of a model holding :class:`ocrkernels.OCRHead`
decomposes the head into standard operators. To keep the fused kernels in a deployment instead:

    import ocrkernels, onnxruntime as ort
    from ocrkernels import onnx_ops

    custom = onnx_ops.with_custom_op_heads(model.eval())       # a copy; model is untouched
    program = torch.onnx.export(custom, (img,), dynamo=True,
                                custom_translation_table=onnx_ops.translation_table())
    program.save("model.onnx")

    options = ort.SessionOptions()
    options.register_custom_ops_library(ocrkernels.onnxruntime_library())
    session = ort.InferenceSession("model.onnx", options)

The node (stable: a C++ ONNX Runtime library may implement it later under the same name):

* domain ``com.ocrkernels`` (:data:`DOMAIN`), opset version 1, operator ``OCRHead``;
* 20 float32 inputs: ``feats`` (B, Cin, H, W), ``coarse_logits`` (B, K, H, W), then the 18
  folded parameters of :data:`ocrkernels.head_eval.PARAMETER_NAMES` (initializers in an
  exported file);
* one float attribute ``scale`` (the spatial softmax's scale);
* one float32 output, the logits (B, K, H, W).

Its function is :func:`ocrkernels.head_eval.ocr_head_reference` (the module docstring of
:mod:`ocrkernels.head_eval` writes it out): mmsegmentation's OCRHead in eval mode, BatchNorm
folded into each conv. The TorchScript exporter (``dynamo=False``) writes the same node through
:func:`register_torchscript_symbolic`.

:func:`onnxruntime_library` serves the node to ONNX Runtime through ``onnxruntime-extensions``
(``pip install onnxruntime-extensions``), whose Python custom operators run
:func:`ocrkernels.head_eval.ocr_head_eval` in this process: the fused CPU kernels, about 10 ms of
copies a call at OCRNet's Cityscapes size. Sessions that use it must live in the Python process
that called it.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from torch import Tensor, nn

from .head_eval import PARAMETER_NAMES, head_parameters, ocr_head_eval
from .modules import OCRHead

__all__ = ["DOMAIN", "OP_TYPE", "OPSET_VERSION", "CustomOpHead", "onnxruntime_library",
           "register_onnx_schema", "register_torchscript_symbolic", "translation_table",
           "with_custom_op_heads"]

DOMAIN = "com.ocrkernels"
OP_TYPE = "OCRHead"
OPSET_VERSION = 1


class CustomOpHead(nn.Module):
    """An eval-mode OCR head as the ``ocrkernels::ocr_head_eval`` op on its folded parameters
    (buffers named as :data:`~ocrkernels.head_eval.PARAMETER_NAMES`): (feats (B, Cin, H, W),
    coarse_logits (B, K, H, W)) -> (B, K, H, W) logits, like the head it was made from."""

    def __init__(self, head: nn.Module):
        super().__init__()
        for name, tensor in zip(PARAMETER_NAMES, head_parameters(head)):
            self.register_buffer(name, tensor.clone())
        self.scale = float(head.spatial_gather_module.scale)

    @property
    def in_channels(self) -> int:
        return self.bottleneck_w.shape[1]

    @property
    def num_classes(self) -> int:
        return self.cls_w.shape[0]

    def forward(self, feats: Tensor, coarse_logits: Tensor) -> Tensor:
        return ocr_head_eval(feats, coarse_logits,
                             *(getattr(self, name) for name in PARAMETER_NAMES),
                             scale=self.scale)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.bottleneck_w.shape[0]}, "
                f"num_classes={self.num_classes}, scale={self.scale}")


def with_custom_op_heads(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every :class:`ocrkernels.OCRHead` replaced by a
    :class:`CustomOpHead` of its folded parameters (``model`` itself is untouched). A model
    that is itself an OCRHead comes back as a CustomOpHead. ValueError when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"with_custom_op_heads: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    model = copy.deepcopy(model).eval()
    if isinstance(model, OCRHead):
        return CustomOpHead(model)
    heads = [name for name, m in model.named_modules() if isinstance(m, OCRHead)]
    if not heads:
        raise ValueError(f"with_custom_op_heads: {type(model).__name__} holds no "
                         "ocrkernels.OCRHead")
    for name in heads:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, CustomOpHead(getattr(owner, attr)))
    return model


def register_onnx_schema() -> None:
    """Register the node's schema with ``onnx`` (once per process): the exporters and
    ``onnx.checker`` then know its inputs, attribute and types."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, OPSET_VERSION, DOMAIN):
        return
    float_tensor = ("T", ["tensor(float)"], "float32 tensors")
    inputs = [OpSchema.FormalParameter(name, "T")
              for name in ("feats", "coarse_logits", *PARAMETER_NAMES)]
    scale = onnx.helper.make_attribute("scale", 1.0)
    schema = OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="OCRNet's OCR head in eval mode on folded parameters (ocrkernels.head_eval).",
        inputs=inputs, outputs=[OpSchema.FormalParameter("logits", "T")],
        type_constraints=[float_tensor],
        attributes=[OpSchema.Attribute("scale", scale, "scale of the spatial softmax")])
    onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the
    ``ocrkernels::ocr_head_eval`` op as the ``com.ocrkernels`` ``OCRHead`` node (needs
    onnxscript, as the dynamo exporter does)."""
    import onnxscript

    register_onnx_schema()
    node = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)[OP_TYPE]

    def ocr_head(feats, coarse_logits, *params_and_scale):
        *params, scale = params_and_scale
        return node(feats, coarse_logits, *params, scale=float(scale))

    return {torch.ops.ocrkernels.ocr_head_eval.default: ocr_head}


_symbolic_registered = False


def register_torchscript_symbolic(opset: int = 18) -> None:
    """Let the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) write
    ``ocrkernels::ocr_head_eval`` as the ``com.ocrkernels`` ``OCRHead`` node; once per
    process."""
    global _symbolic_registered
    if _symbolic_registered:
        return
    from torch.onnx import symbolic_helper

    register_onnx_schema()

    def symbolic(g, feats, coarse_logits, *params_and_scale):
        *params, scale = params_and_scale
        out = g.op(f"{DOMAIN}::{OP_TYPE}", feats, coarse_logits, *params,
                   scale_f=symbolic_helper._maybe_get_const(scale, "f"))
        out.setType(feats.type().with_sizes(None))
        return out

    torch.onnx.register_custom_op_symbolic("ocrkernels::ocr_head_eval", symbolic, opset)
    _symbolic_registered = True


class _Result:
    """What the ``onnxruntime-extensions`` Python-op hook reads off a result: ``shape`` and
    ``flatten().tolist()``, which here is the contiguous array itself (the hook's C++ side
    copies any buffer into the output tensor; a Python list of 10^6 floats took 40 ms)."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self.shape = self.array.shape

    def flatten(self) -> "_Result":
        return self

    def tolist(self) -> np.ndarray:
        return self.array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype, copy=False)


_library_lock = threading.Lock()
_library_path: str | None = None


def onnxruntime_library() -> str:
    """Register the ``com.ocrkernels`` operators with ``onnxruntime-extensions`` (once per
    process) and return the library path to pass to
    ``onnxruntime.SessionOptions.register_custom_ops_library``.

    ImportError, saying what to install, without ``onnxruntime-extensions``."""
    global _library_path
    with _library_lock:
        if _library_path is not None:
            return _library_path
        try:
            from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
        except ImportError:
            raise ImportError("ocrkernels.onnxruntime_library needs onnxruntime-extensions "
                              "(pip install onnxruntime-extensions)") from None
        f32 = PyCustomOpDef.dt_float

        @onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}", inputs=[f32] * (2 + len(PARAMETER_NAMES)),
                 outputs=[f32], attrs={"scale": f32})
        def _ocr_head(feats, coarse_logits, *params, scale=1.0):
            # The hook hands over fresh float32 arrays (copies of ONNX Runtime's tensors):
            # torch reads them in place.
            tensors = [torch.from_numpy(a) for a in (feats, coarse_logits, *params)]
            with torch.inference_mode():
                out = ocr_head_eval(*tensors, scale=float(scale))
            return _Result(out.numpy())

        _library_path = get_library_path()
        return _library_path
