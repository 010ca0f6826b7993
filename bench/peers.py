"""What a user could run instead of the fast path, as modules the whole-model bench times beside
it (``bench/models.py``): ``torch.compile`` of the reference model and ONNX Runtime on the
reference model's ONNX export; and our own deployment path beside them, ONNX Runtime running
the export with the OCR head as our custom op (:func:`build_onnxruntime_fused`).

Each builder returns ``(module, version line)`` or raises :class:`PeerUnavailable` with the
reason (ONNX Runtime is an optional dependency: ``pip install onnxruntime onnxscript``), so that
the bench skips that row and says why instead of failing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import Tensor, nn

__all__ = ["PEERS", "PeerUnavailable", "build_onnxruntime_fused", "build_peer"]


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says why."""


class _Compiled(nn.Module):
    """``torch.compile`` (inductor) of the eager model with ``freezing``: the weights become
    constants, so inductor folds BatchNorm into the convolutions and prepacks them, the best
    it can do for inference."""

    def __init__(self, eager: nn.Module):
        super().__init__()
        self.eager = eager
        self.compiled = torch.compile(eager, backend="inductor")

    def forward(self, x: Tensor) -> Tensor:
        # Imported here: inductor imports Triton, which the tests must not load before they
        # set TRITON_INTERPRET (they import this module at collection).
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


class _OnnxRuntime(nn.Module):
    """An ONNX Runtime session (CPU execution provider, the torch thread count) on the ONNX
    export of the eager model, called like the model."""

    def __init__(self, session, input_name: str):
        super().__init__()
        self.session, self.input_name = session, input_name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)


def _compile_peer(eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    return _Compiled(eager), f"torch.compile (inductor, freezing) of torch {torch.__version__}"


def _session(model, library: str | None = None):
    """An ONNX Runtime session on ``model`` (a path or bytes) as the bench runs every ONNX
    path: CPU execution provider, the torch thread count, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if library is not None:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return _OnnxRuntime(session, session.get_inputs()[0].name)


def _quiet_export(export, *args, **kwargs):
    """``export(*args, **kwargs)`` with the ONNX exporter's stdout chatter and log off: the
    bench keeps stdout for its table and stderr for progress."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return export(*args, **kwargs)
    finally:
        exporter_log.setLevel(level)


def _onnxruntime_peer(eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PeerUnavailable("onnxruntime is not installed (pip install onnxruntime "
                              "onnxscript)") from None
    from ocrnet.models.segmentor import OCRNet

    threads = torch.get_num_threads()
    try:  # both exports use the dynamo exporter, which needs onnxscript
        if isinstance(eager, OCRNet):
            # The best plain ONNX we know for an OCRNet: what `ocrnet export` writes (BatchNorm
            # folded, standard operators only), a few percent faster in ONNX Runtime than the
            # export of the eager model.
            from ocrnet.inference.export import onnx_bytes

            data, _ = _quiet_export(onnx_bytes, eager, tuple(example.shape[2:]))
            source = "the `ocrnet export` ONNX file (standard operators, BatchNorm folded)"
        else:
            data = _quiet_export(torch.onnx.export, eager, (example,), dynamo=True,
                                 optimize=True, verbose=False).model_proto.SerializeToString()
            source = "the torch.onnx (dynamo) export"
    except ImportError as exc:
        raise PeerUnavailable(f"ONNX export needs onnxscript ({exc})") from None
    return _session(data), (f"ONNX Runtime {ort.__version__} (CPU EP, {threads} threads, all "
                            f"graph optimisations) on {source}")


def build_onnxruntime_fused(eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    """Our deployment path, not a peer: ONNX Runtime on ``ocrnet export --fused-ops`` of the
    OCRNet ``eager`` (the OCR head as the ``com.ocrkernels`` node, run by
    :func:`ocrkernels.onnxruntime_library`); PeerUnavailable without onnxruntime,
    onnxruntime-extensions or onnxscript."""
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401 -- the dynamo exporter's
        from ocrkernels import onnxruntime_library

        library = onnxruntime_library()
    except ImportError as exc:
        raise PeerUnavailable(f"{exc} (pip install onnxruntime onnxscript "
                              "onnxruntime-extensions)") from None
    from ocrnet.inference.export import onnx_bytes

    data, _ = _quiet_export(onnx_bytes, eager, tuple(example.shape[2:]), fused_ops=True)
    return _session(data, library), (f"ONNX Runtime {ort.__version__} on `ocrnet export "
                                     "--fused-ops` (the OCR head as ocrkernels' custom op)")


PEERS = {"compile": _compile_peer, "onnxruntime": _onnxruntime_peer}


def build_peer(name: str, eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    """The peer ``name`` (a key of :data:`PEERS`) of the eval-mode ``eager`` model, built for
    inputs like ``example`` (1, 3, H, W); raises :class:`PeerUnavailable` with the reason."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return PEERS[name](eager, example)
