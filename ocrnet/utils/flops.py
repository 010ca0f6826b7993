"""FLOPs of one forward by part of an OCRNet, counted by
``torch.utils.flop_counter.FlopCounterMode``.

What is counted: 2 x the multiply-adds of every convolution (2 x output elements x
in_channels / groups x kernel area) and matrix product (``mm``, ``bmm``, ``addmm``, ... : 2 x
M x N x K) that torch dispatches, plus the ``torch.ops.ocrkernels`` ops, whose formulas
:mod:`ocrkernels.flops` registers (charged what the plain-PyTorch reference spends, so the fused
inference path and the reference report the same total). Bias adds, BatchNorm, ReLU, softmax,
resizes and sums are not counted. mmseg's tables (fvcore / mmcv counters) count one
multiply-add as one "FLOP": compare theirs with FLOPs / 2.

Meta tensors need nothing special: the OCR modules run their reference on them, and a custom op
called directly on meta tensors goes through its registered fake and is counted the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ocrkernels.flops import register_flop_formulas

__all__ = ["PARTS", "count_model_flops"]

_onednn_registered = False


def _register_onednn_formulas() -> None:
    """FLOP formulas for oneDNN's fused convolutions (``torch.ops.mkldnn._convolution_pointwise``,
    its ``binary`` overload and the in-place ``_convolution_pointwise_.binary``, which the fast
    path's backbone runs,
    ``ocrnet/inference/fused_convs.py``): the convolution's count, the fused ReLU and sum not
    counted, like the unfused modules' ReLU and sum. Once; nothing where torch lacks the ops."""
    global _onednn_registered
    if _onednn_registered or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    _onednn_registered = True

    # One formula for the packets, which covers every overload: default (X, W, B, ...),
    # binary (X, other, W, B, ...) and the in-place binary (other, X, W, B, ...) of
    # _convolution_pointwise_: the weight is the third argument when that is 4-d (a bias is
    # 1-d or None); the first argument has the input's batch size either way, and the count
    # reads only the batch size from it.
    def formula(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
        w_shape = third if third is not None and len(third) == 4 else second
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    register_flop_formula(torch.ops.mkldnn._convolution_pointwise)(formula)
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise_"):
        register_flop_formula(torch.ops.mkldnn._convolution_pointwise_)(formula)

# The top-level parts of an OCRNet, the keys (with "total") of the counts returned here.
PARTS = ("backbone", "aux_head", "ocr_head")


def _tracked_names(model: nn.Module) -> dict[nn.Module, str]:
    """The names FlopCounterMode's module tracker (``torch.utils.module_tracker``) gives the
    modules of ``model``: the root's class name, then the attribute path through
    ``named_children``, each module's children named on its first visit and a module reached
    twice keeping the last name (the OCR head is ``OCRNet.decode_head.1``; ``model.ocr_head``
    only aliases it)."""
    names = {model: type(model).__name__}
    seen = set()

    def visit(mod: nn.Module) -> None:
        if mod in seen:
            return
        seen.add(mod)
        for child_name, child in mod.named_children():
            names[child] = f"{names[mod]}.{child_name}"
            visit(child)

    visit(model)
    return names


def count_model_flops(model: nn.Module, x: Tensor) -> dict[str, int]:
    """FLOPs of ``model(x)`` under ``torch.no_grad()``, by part.

    Args:
        model: an OCRNet (``backbone``, ``aux_head`` and ``ocr_head``), in the mode it is to
            be counted in (eval for inference: the fused kernels run only in eval mode without
            autograd); on any device, the "meta" device included.
        x: the (B, 3, H, W) input, on the model's device.

    Returns:
        ``{"backbone", "aux_head", "ocr_head", "total"}``, total = the sum of the parts.
        Raises RuntimeError if anything is counted outside the three parts (the segmentor's
        own glue does only resizes and concatenations, which are not counted).
    """
    # Imported here: torch.utils.flop_counter imports Triton, which must not happen before a
    # caller sets TRITON_INTERPRET (importing ocrnet must not decide that).
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()  # the fused ops count as what the reference spends on them
    _register_onednn_formulas()
    tracked = _tracked_names(model)
    names = {part: tracked[getattr(model, part)] for part in PARTS}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    by_module = counter.get_flop_counts()
    counts = {part: sum(by_module.get(name, {}).values()) for part, name in names.items()}
    counts["total"] = sum(counts.values())
    if counts["total"] != counter.get_total_flops():
        raise RuntimeError(f"count_model_flops: {counter.get_total_flops()} FLOPs counted in "
                           f"all, {counts['total']} of them in the parts {PARTS}")
    return counts
