"""What a user could run instead of the fast path, as modules the whole-model bench times beside
it (``bench/models.py``): ``torch.compile`` of the reference model and ONNX Runtime on the
reference model's ONNX export.

Each builder returns ``(module, version line)`` or raises :class:`PeerUnavailable` with the
reason (ONNX Runtime is an optional dependency: ``pip install onnxruntime onnxscript``), so that
the bench skips that row and says why instead of failing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["PEERS", "PeerUnavailable", "build_peer"]


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


def _onnxruntime_peer(eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PeerUnavailable("onnxruntime is not installed (pip install onnxruntime "
                              "onnxscript)") from None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        exporter_log = logging.getLogger("torch.onnx")
        level = exporter_log.level
        try:
            # The exporter reports its steps on stdout and its registry on the log; the bench
            # keeps stdout for its table and stderr for progress.
            exporter_log.setLevel(logging.ERROR)
            with warnings.catch_warnings(), torch.no_grad(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(eager, (example,), str(path), dynamo=True, optimize=True,
                                  verbose=False)
        except ImportError as exc:  # the dynamo exporter needs onnxscript
            raise PeerUnavailable(f"ONNX export needs onnxscript ({exc})") from None
        finally:
            exporter_log.setLevel(level)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options,
                                       providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _OnnxRuntime(session, name), (f"ONNX Runtime {ort.__version__} (CPU EP, "
                                         f"{torch.get_num_threads()} threads, all graph "
                                         "optimisations) on the torch.onnx (dynamo) export")


PEERS = {"compile": _compile_peer, "onnxruntime": _onnxruntime_peer}


def build_peer(name: str, eager: nn.Module, example: Tensor) -> tuple[nn.Module, str]:
    """The peer ``name`` (a key of :data:`PEERS`) of the eval-mode ``eager`` model, built for
    inputs like ``example`` (1, 3, H, W); raises :class:`PeerUnavailable` with the reason."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return PEERS[name](eager, example)
