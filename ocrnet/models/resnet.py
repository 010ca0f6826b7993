"""Residual blocks and the ResNetV1c backbone of OCRNet-R101-D8.

Module and parameter names follow mmsegmentation's ``ResNetV1c`` / ``BasicBlock`` /
``Bottleneck`` (``conv1``, ``bn1``, ..., ``downsample.0`` / ``downsample.1``, ``stem.0`` ...
``stem.8``), so a mmsegmentation state dict loads without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .recompute import checkpoint_call

__all__ = ["BasicBlock", "Bottleneck", "ResNetV1c", "RESNET_DEPTHS"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding == dilation keeps the spatial size of a stride-1 3x3 convolution.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """The projection shortcut: 1x1 conv (stride) -> BN, keys ``downsample.0`` / ``.1``."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: (B, inplanes, H, W) ->
    (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        # mmseg's BasicBlock uses dilation only in the first convolution.
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 conv-BN bottleneck ("pytorch" style: the stride sits on the 3x3).

    (B, inplanes, H, W) -> (B, 4 * planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_res_layer(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int,
                   num_blocks: int, stride: int = 1, dilation: int = 1,
                   contract_dilation: bool = False) -> nn.Sequential:
    """A stage of ``num_blocks`` residual blocks; the first one carries the stride and, when
    the channels change, the projection shortcut.

    ``contract_dilation`` halves the first block's dilation (as mmseg's ResLayer does), which
    avoids gridding where the resolution stops shrinking.
    """
    if num_blocks < 1:
        raise ValueError(f"make_res_layer: num_blocks must be >= 1, got {num_blocks}")
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_ch:
        downsample = _downsample(inplanes, out_ch, stride)
    first_dilation = dilation // 2 if (contract_dilation and dilation > 1) else dilation
    layers = [block(inplanes, planes, stride, first_dilation, downsample)]
    layers += [block(out_ch, planes, 1, dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


# depth -> blocks per stage (Bottleneck).
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNetV1c(nn.Module):
    """ResNetV1c: a deep 3x(3x3 conv) stem, max-pool, four Bottleneck stages.

    With the OCRNet "D8" settings (strides (1, 2, 1, 1), dilations (1, 1, 2, 4),
    contract_dilation) the output stride is 8.

    Input (B, in_channels, H, W); output: a list of the four stage outputs,
    (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 1024, H/8, W/8), (B, 2048, H/8, W/8)
    for D8 (sizes rounded up as the strided convolutions round them).

    ``with_cp``: activation checkpointing in training (:mod:`ocrnet.models.recompute`, as
    mmseg's ``with_cp``): the stem with the max-pool and each Bottleneck keep only their inputs
    for backward and run again there; the same loss, gradients and BatchNorm running statistics
    as without, no effect in eval mode or without autograd. May be changed at any time.
    """

    def __init__(self, depth: int = 101, in_channels: int = 3, stem_channels: int = 64,
                 base_channels: int = 64, strides: Sequence[int] = (1, 2, 1, 1),
                 dilations: Sequence[int] = (1, 1, 2, 4), contract_dilation: bool = True,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNetV1c: depth must be one of {sorted(RESNET_DEPTHS)}, "
                             f"got {depth}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError(f"ResNetV1c: strides and dilations need 4 entries, got "
                             f"{tuple(strides)} and {tuple(dilations)}")
        self.depth = depth
        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_channels
        self.out_channels: list[int] = []
        for i, num_blocks in enumerate(RESNET_DEPTHS[depth]):
            planes = base_channels * 2 ** i
            layer = make_res_layer(Bottleneck, inplanes, planes, num_blocks, strides[i],
                                   dilations[i], contract_dilation)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * Bottleneck.expansion
            self.out_channels.append(inplanes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C_in, H, W) -> list of the four stage outputs (see the class docstring)."""
        cp = self.with_cp and self.training
        x = checkpoint_call(lambda t: self.maxpool(self.stem(t)), x, enabled=cp,
                            batchnorms=self.stem)
        outs = []
        for i in range(4):
            for block in getattr(self, f"layer{i + 1}"):
                x = checkpoint_call(block, x, enabled=cp, batchnorms=block)
            outs.append(x)
        return outs
