"""The backbone's folded convolutions with their ReLU and residual sum fused in, by oneDNN's
post-ops (``torch.ops.mkldnn._convolution_pointwise``, what inductor's CPU backend emits for
the same pattern): one pass over each output map instead of three (conv, add, ReLU).

Used by :func:`ocrnet.prepare_for_inference` for CPU models in channels_last, after BatchNorm
folding:

* a residual block's (``BasicBlock``, ``Bottleneck``) convolutions run as :class:`ConvReLU`,
  its last one adding the shortcut and applying the ReLU in the convolution's epilogue;
* ``conv -> Identity (folded BN) -> ReLU`` sequences (HRNet's transitions and fuse layers)
  and HRNet's stem become one :class:`ConvReLU`.

The same function as the modules they replace, up to fp32 rounding (the sum is added after the
convolution's bias, as before). On the 2-core machines of docs/PERFORMANCE.md a 64 -> 256 1x1
convolution plus sum plus ReLU at 128x256 took 9.6 ms unfused and 5.4 ms fused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.hrnet import HRNet
from ..models.resnet import BasicBlock, Bottleneck

__all__ = ["ConvReLU", "FusedResidualBlock", "fuse_backbone", "fusion_available"]


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

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        args = (self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, *args, "relu" if self.relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.weight, self.bias, *args, "add", None, "relu", [], "")

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={tuple(self.stride)}, "
                f"relu={self.relu}")


class FusedResidualBlock(nn.Module):
    """A folded BasicBlock or Bottleneck: its convolutions in order, the first ones with ReLU,
    the last adding the shortcut (``downsample`` when the block has one) and applying ReLU."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck)
                                              else [])
        self.convs = nn.ModuleList([ConvReLU(c, relu=True) for c in convs])
        self.downsample = None
        if block.downsample is not None:
            conv = _folded_conv(block.downsample)
            self.downsample = ConvReLU(conv, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, identity)


def _folded_conv(seq: nn.Module) -> nn.Conv2d:
    """The conv of a folded ``Sequential(conv, Identity)`` shortcut."""
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else [seq]
    if (not mods or not isinstance(mods[0], nn.Conv2d)
            or not all(isinstance(m, nn.Identity) for m in mods[1:])):
        raise ValueError(f"fuse_backbone: expected a folded conv shortcut, got {seq}")
    return mods[0]


def _conv_relu_sequence(seq: nn.Module) -> bool:
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    return (len(mods) == 3 and isinstance(mods[0], nn.Conv2d) and isinstance(mods[1], nn.Identity)
            and isinstance(mods[2], nn.ReLU))


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
        for name, child in list(module.named_children()):
            if isinstance(child, (BasicBlock, Bottleneck)):
                setattr(module, name, FusedResidualBlock(child))
                count += 1
            elif _conv_relu_sequence(child):
                setattr(module, name, ConvReLU(child[0], relu=True))
                count += 1
            else:
                stack.append(child)
    return count
