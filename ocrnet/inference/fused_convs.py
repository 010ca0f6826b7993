"""The backbone's folded convolutions with their ReLU and residual sum fused in, by oneDNN's
post-ops (``torch.ops.mkldnn._convolution_pointwise``, what inductor's CPU backend emits for
the same pattern): one pass over each output map instead of three (conv, add, ReLU).

Used by :func:`ocrnet.prepare_for_inference` for CPU models in channels_last, after BatchNorm
folding:

* a residual block's (``BasicBlock``, ``Bottleneck``) convolutions run as :class:`ConvReLU`,
  its last one adding the shortcut and applying the ReLU in the convolution's epilogue;
* ``conv -> Identity (folded BN) [-> ReLU]`` runs in Sequentials (HRNet's transitions and
  fuse layers) and HRNet's stem become one :class:`ConvReLU` each.

The same function as the modules they replace, up to fp32 rounding (the sum is added after the
convolution's bias, as before). The weights are prepacked into oneDNN's blocked layout once per
input shape, as inductor's freezing does. On the 2-core machines of docs/PERFORMANCE.md a 64 -> 256 1x1
convolution plus sum plus ReLU at 128x256 took 9.6 ms unfused and 5.4 ms fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocrkernels import backends

from ..models.hrnet import HRNet
from ..models.resnet import BasicBlock, Bottleneck

__all__ = ["ConvReLU", "FusedResidualBlock", "MAX_PACKED", "fuse_backbone", "fusion_available"]

# Input shapes per ConvReLU whose prepacked weights are kept (one per image size in use).
MAX_PACKED = 4
# oneDNN's weight prepacking, where this torch has it.
_PREPACK = hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


def fusion_available() -> bool:
    """Whether this torch has oneDNN's fused convolution (x86 and Arm builds with mkldnn)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class ConvReLU(nn.Module):
    """A folded ``nn.Conv2d`` (with bias), then optionally ``+ residual``, then optionally ReLU:
    (B, C, H, W) [+ (B, O, H', W')] -> (B, O, H', W'). With a residual the ReLU always follows
    (the residual blocks' pattern)."""

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"ConvReLU: needs numeric zero padding, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone() if conv.bias is not None else
                                 conv.weight.new_zeros(conv.out_channels), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        # (input shape, dtype, weight version) -> the weight in oneDNN's blocked layout for
        # that input: see _weight_for.
        self._packed: dict[tuple, Tensor] = {}

    def forward(self, x: Tensor, residual: Tensor | None = None,
                accumulate: bool = False) -> Tensor:
        """``relu?(conv(x) [+ residual])``. ``accumulate``: the residual is a map nobody else
        reads (a fresh shortcut, or a block input only this block sees), so the fast path may
        write the result over it (oneDNN's in-place sum: no fresh output map, 5-15% faster at
        ResNet-D8's 1x1 widths); the caller must use the return value."""
        if backends.exporting_onnx() or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and (
                    x.requires_grad or self.weight.requires_grad
                    or (residual is not None and residual.requires_grad))):
            # oneDNN's fused op has no derivative (autograd would silently drop the gradient),
            # no ONNX translation and, for the residual form, no fake implementation for
            # torch.compile / torch.export (inductor fuses the plain ops the same way itself).
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)
            if residual is not None:
                return F.relu(y + residual)
            return F.relu(y) if self.relu else y
        args = (self.padding, self.stride, self.dilation, self.groups)
        weight = self._weight_for(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, *args, "relu" if self.relu else "none", [], "")
        if accumulate and residual.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, weight, self.bias, *args, "add", 1.0, "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, self.bias, *args, "add", None, "relu", [], "")

    def _weight_for(self, x: Tensor) -> Tensor:
        """The weight prepacked by oneDNN for inputs of ``x``'s shape (what inductor's freezing
        does): the same products, bit for bit, without reordering the weight on every call
        (4-15% of these convolutions' time at HRNet's widths, docs/PERFORMANCE.md). Packed on
        the first call of each shape (at most :data:`MAX_PACKED` kept); the plain weight off the
        CPU."""
        if x.device.type != "cpu" or not _PREPACK:
            return self.weight
        key = (tuple(x.shape), x.dtype, self.weight._version)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= MAX_PACKED:
                self._packed.clear()
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups,
                list(x.shape))
            self._packed[key] = packed
        return packed

    def _apply(self, fn, recurse=True):
        self._packed.clear()  # moved or cast: the packed copies are stale
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = {}  # oneDNN tensors neither pickle nor deep-copy; repacked on use
        return state

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={tuple(self.stride)}, "
                f"relu={self.relu}")


class FusedResidualBlock(nn.Module):
    """A folded BasicBlock or Bottleneck: its convolutions in order, the first ones with ReLU,
    the last adding the shortcut (``downsample`` when the block has one) and applying ReLU.

    The last convolution writes its result over the shortcut's map when that map is private: a
    fresh ``downsample`` output, or the block's input when ``input_is_private`` (a block after
    the first in a Sequential of blocks, whose input is the previous block's output and read by
    this block only; a forward hook that keeps such an input sees it overwritten)."""

    def __init__(self, block: BasicBlock | Bottleneck, input_is_private: bool = False):
        super().__init__()
        self.input_is_private = input_is_private
        convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck)
                                              else [])
        self.convs = nn.ModuleList([ConvReLU(c, relu=True) for c in convs])
        self.downsample = None
        if block.downsample is not None:
            conv = _folded_conv(block.downsample)
            self.downsample = ConvReLU(conv, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        private = self.downsample is not None or self.input_is_private
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, identity, accumulate=private)


def _folded_conv(seq: nn.Module) -> nn.Conv2d:
    """The conv of a folded ``Sequential(conv, Identity)`` shortcut."""
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else [seq]
    if (not mods or not isinstance(mods[0], nn.Conv2d)
            or not all(isinstance(m, nn.Identity) for m in mods[1:])):
        raise ValueError(f"fuse_backbone: expected a folded conv shortcut, got {seq}")
    return mods[0]


def _fuse_sequential(seq: nn.Sequential) -> int:
    """In a folded Sequential, each ``conv -> Identity (folded BN) [-> ReLU]`` run becomes
    ``ConvReLU -> Identity [-> Identity]`` in place (HRNet's transitions and fuse layers, the
    latter ending in an Upsample). Returns the number of convolutions replaced."""
    mods = list(seq.children())
    names = list(seq._modules)
    count = 0
    for k, (conv, nxt) in enumerate(zip(mods, mods[1:])):
        if (isinstance(conv, nn.Conv2d) and isinstance(nxt, nn.Identity)
                and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"):
            relu = k + 2 < len(mods) and isinstance(mods[k + 2], nn.ReLU)
            setattr(seq, names[k], ConvReLU(conv, relu=relu))
            if relu:
                setattr(seq, names[k + 2], nn.Identity())
            count += 1
    return count


def fuse_backbone(backbone: nn.Module) -> int:
    """Replace, in place, the folded residual blocks and conv-ReLU sequences of ``backbone``
    (BatchNorm already folded: :func:`ocrnet.inference.fastpath.fold_batchnorm`).

    Returns:
        the number of modules replaced.
    """
    count = 0
    if isinstance(backbone, HRNet) and isinstance(backbone.bn1, nn.Identity):
        # The stem: conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu, with one shared ReLU module.
        backbone.conv1 = ConvReLU(backbone.conv1, relu=True)
        backbone.conv2 = ConvReLU(backbone.conv2, relu=True)
        backbone.relu = nn.Identity()
        count += 2
    stack = [backbone]
    while stack:
        module = stack.pop()
        previous = None
        for name, child in list(module.named_children()):
            if isinstance(child, (BasicBlock, Bottleneck)):
                # In a Sequential, a block's input is the previous child's output, which only
                # this block reads when that child is a residual block too.
                private = isinstance(module, nn.Sequential) and isinstance(
                    previous, (BasicBlock, Bottleneck, FusedResidualBlock))
                setattr(module, name, FusedResidualBlock(child, input_is_private=private))
                count += 1
            else:
                if isinstance(child, nn.Sequential):
                    count += _fuse_sequential(child)
                stack.append(child)
            previous = child
    return count
