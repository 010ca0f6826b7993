"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for eval-mode inference on the
CPU: 36 products per 4x4 output block and channel pair instead of 144, so a wide 3x3 convolution
(OCRNet's 270 -> 512 bottleneck, 81.5 of hr18s' 178 GFLOP) costs about a third of oneDNN's
direct convolution (docs/PERFORMANCE.md).

    U = transform_weight(conv.weight)                       # (36, O, C), once
    y = conv3x3_winograd(x, conv.weight, U, conv.bias)      # == conv2d(x, w, b, padding=1)

Exactness: the same function as ``F.conv2d(x, weight, bias, padding=1)`` (stride 1, no
dilation, no groups) up to rounding. The transforms add values of up to 10x the tile's largest
input, so the error is larger than the direct convolution's; measured against a float64
convolution it stays near 1e-5 relative (tests/test_winograd.py bounds it). Non-finite inputs or
weights take the direct convolution (where the reference puts NaN and +-Inf).

Autograd differentiates the direct convolution of ``weight`` (the transformed weight is derived
from it and gets no gradient), so a model that holds the op can still be trained or checked
with gradcheck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from ._extension import extension_loaded

__all__ = ["WinogradConv2d", "conv3x3_winograd", "register_autograd", "transform_weight",
           "winograd_applies"]

# F(4x4, 3x3) with interpolation points 0, +-1, +-2 and infinity (Lavin and Gray, 2016).
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def transform_weight(weight: Tensor) -> Tensor:
    """(O, C, 3, 3) -> (36, O, C): ``G g G^T`` of every filter, computed in float64 and rounded
    once to ``weight``'s dtype; entry ``s = 6 i + j`` holds element (i, j) of the 6x6 tile."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"transform_weight: weight must have shape (O, C, 3, 3), got "
                         f"{tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ik,ockl,jl->ijoc", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def winograd_applies(conv: nn.Module) -> bool:
    """Whether ``conv`` is a 3x3 convolution the kernel computes: stride 1, padding 1, no
    dilation, no groups, zero padding."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def conv3x3_winograd(x: Tensor, weight: Tensor, weight_winograd: Tensor | None = None,
                     bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``relu?(conv2d(x, weight, bias, padding=1))`` by F(4x4, 3x3) on the CPU.

    Shapes: x (B, C, H, W), weight (O, C, 3, 3), weight_winograd (36, O, C) (computed with
    :func:`transform_weight` when None; pass it to skip that per call), bias (O,) or None ->
    (B, O, H, W). Elsewhere (CUDA, other dtypes, no compiled library) the direct convolution.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"conv3x3_winograd: x must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not backends.compiled_winograd(x):
        y = F.conv2d(x, weight, bias, padding=1)
        return F.relu(y) if relu else y
    if weight_winograd is None:
        weight_winograd = transform_weight(weight)
    return torch.ops.ocrkernels.conv3x3_winograd(x, weight, weight_winograd, bias, relu)


class WinogradConv2d(nn.Module):
    """A 3x3 convolution (see :func:`winograd_applies`), optionally followed by ReLU, as
    :func:`conv3x3_winograd` with the weight transformed once: (B, C, H, W) -> (B, O, H, W)."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        if not winograd_applies(conv):
            raise ValueError(f"WinogradConv2d: conv must be 3x3, stride 1, padding 1, no "
                             f"dilation or groups, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach().clone(), requires_grad=False))
        self.register_buffer("weight_winograd", transform_weight(self.weight), persistent=False)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3_winograd(x, self.weight, self.weight_winograd, self.bias, self.relu)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=(3, 3), "
                f"relu={self.relu}")


def _setup_context(ctx, inputs, output):
    x, weight, _, bias, relu = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.has_bias = bias is not None
    ctx.relu = relu


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (out > 0)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1],
        False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]])
    return gx, gw, None, gb, None


_autograd_registered = False


def register_autograd() -> None:
    """The op's backward: the direct convolution's (once; nothing without the op library)."""
    global _autograd_registered
    if _autograd_registered or not extension_loaded():
        return
    _autograd_registered = True
    torch.library.register_autograd("ocrkernels::conv3x3_winograd", _backward,
                                    setup_context=_setup_context)
