"""HRNetV2p backbones (W18-Small, W18, W48) as mmsegmentation builds them.

Module and parameter names follow mmsegmentation's ``HRNet`` / ``HRModule`` exactly
(``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``, ``transition1.1.0.0``,
``stage2.0.branches.0.0.conv1``, ``stage3.0.fuse_layers.2.0.1.0`` ...), so the ``backbone.*``
keys of a mmsegmentation checkpoint (and, without the prefix, the official HRNet ImageNet
checkpoints) load unchanged. Branch ``i`` runs at 1/2^(i+2) of the input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recompute import checkpoint_call
from .resnet import BasicBlock, Bottleneck, make_res_layer

__all__ = ["HRNet", "HRNET_ARCHS", "StageSpec", "hrnet_arch", "hrnet_width"]

_BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


@dataclass(frozen=True)
class StageSpec:
    """One HRNet stage: ``num_modules`` HRModules of ``num_branches`` parallel branches."""

    num_modules: int
    num_branches: int
    block: str  # "BASIC" or "BOTTLENECK"
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]

    def __post_init__(self):
        if self.block not in _BLOCKS:
            raise ValueError(f"StageSpec: block must be one of {sorted(_BLOCKS)}, "
                             f"got {self.block!r}")
        if not (len(self.num_blocks) == len(self.num_channels) == self.num_branches):
            raise ValueError(f"StageSpec: num_blocks {self.num_blocks} and num_channels "
                             f"{self.num_channels} need num_branches={self.num_branches} "
                             "entries")


def _stages(width: int, stem: int, blocks: int, modules: tuple[int, int]
            ) -> tuple[StageSpec, ...]:
    """HRNetV2p with branch widths (w, 2w, 4w, 8w), ``blocks`` blocks per branch, a Bottleneck
    stage 1 of ``stem`` planes and ``modules`` HRModules in stages 3 and 4."""
    c = (width, 2 * width, 4 * width, 8 * width)
    return (StageSpec(1, 1, "BOTTLENECK", (blocks,), (stem,)),
            StageSpec(1, 2, "BASIC", (blocks,) * 2, c[:2]),
            StageSpec(modules[0], 3, "BASIC", (blocks,) * 3, c[:3]),
            StageSpec(modules[1], 4, "BASIC", (blocks,) * 4, c))


# The ``extra`` settings of mmseg's configs/_base_/models/ocrnet_hr18.py and the hr18s / hr48
# overrides in configs/ocrnet/; then two small variants of ours for the synthetic CPU demo and
# the training tests (named, so that configs stay serialisable).
HRNET_ARCHS: dict[str, tuple[StageSpec, ...]] = {
    "w18_small": _stages(18, 64, 2, (3, 2)),
    "w18": _stages(18, 64, 4, (4, 3)),
    "w48": _stages(48, 64, 4, (4, 3)),
    "w12_lite": _stages(12, 32, 1, (2, 1)),  # ~1 M parameters with a 128/64 OCR head
    "w8_tiny": _stages(8, 16, 1, (1, 1)),  # ~0.3 M parameters
}


def hrnet_width(name: str) -> int:
    """The first branch's width of a named architecture (18 for ``w18_small``)."""
    return hrnet_arch(name)[1].num_channels[0]


def hrnet_arch(name: str) -> tuple[StageSpec, ...]:
    """The stage specs of a named architecture (``w18_small``, ``w18``, ``w48``)."""
    try:
        return HRNET_ARCHS[name]
    except KeyError:
        raise ValueError(f"hrnet_arch: unknown arch {name!r}; known: "
                         f"{', '.join(sorted(HRNET_ARCHS))}") from None


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1,
             relu: bool = False) -> nn.Sequential:
    """conv (no bias) -> BN [-> ReLU] as an nn.Sequential, indices 0/1[/2] as in mmseg."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Upsample(nn.Module):
    """Bilinear upsampling by an integer factor (align_corners=False), no parameters.

    Like mmseg's ``Upsample(scale_factor=...)`` the output size is ``int(size * factor)``.
    """

    def __init__(self, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: Tensor) -> Tensor:
        # An integer factor: the product is exact, and stays symbolic under torch.export
        # (int() of a symbolic size would bake the traced image's size into the graph).
        size = [s * self.scale_factor for s in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode=bilinear, align_corners=False"


class HRModule(nn.Module):
    """Parallel branches followed by the multi-resolution fusion.

    Input and output: a list of ``num_branches`` maps, branch i of shape
    (B, C_i, H / 2^i, W / 2^i). Output i = ReLU(sum_j fuse[i][j](branch_j)), where fuse[i][i]
    is the identity, j > i is 1x1 conv-BN then bilinear upsampling, and j < i is a chain of
    i - j stride-2 3x3 conv-BN (ReLU between them, none after the last).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, ...],
                 in_channels: list[int], num_channels: tuple[int, ...]):
        super().__init__()
        self.num_branches = len(num_channels)
        self.branches = nn.ModuleList()
        self.out_channels: list[int] = []
        for i in range(self.num_branches):
            self.branches.append(make_res_layer(block, in_channels[i], num_channels[i],
                                                num_blocks[i]))
            self.out_channels.append(num_channels[i] * block.expansion)
        self.fuse_layers = self._make_fuse_layers() if self.num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self) -> nn.ModuleList:
        ch = self.out_channels
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches):
            row = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:
                    up = _conv_bn(ch[j], ch[i], 1)
                    up.append(Upsample(2 ** (j - i)))
                    row.append(up)
                elif j == i:
                    row.append(None)
                else:
                    # i - j halvings; only the last one changes the channel count.
                    steps = [_conv_bn(ch[j], ch[j], 3, stride=2, relu=True)
                             for _ in range(i - j - 1)]
                    steps.append(_conv_bn(ch[j], ch[i], 3, stride=2))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(row)
        return fuse_layers

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        # Without autograd the sum accumulates in place into a map this loop made (never into a
        # branch output, which the other rows read): the same additions in the same order, one
        # map fewer per term.
        in_place = not torch.is_grad_enabled()
        for i, row in enumerate(self.fuse_layers):
            y, owned = None, False
            # Summed in branch order j = 0, 1, ... as mmseg does (same rounding).
            for j, x in enumerate(xs):
                if j == i:
                    t = x
                else:
                    t = row[j](x)
                    if j > i and t.shape[-2:] != xs[i].shape[-2:]:
                        # Odd sizes: the x2^k upsampling overshoots by a pixel; mmseg then
                        # resizes to the exact size of branch i.
                        t = F.interpolate(t, size=xs[i].shape[-2:], mode="bilinear",
                                          align_corners=False)
                if y is None:
                    y, owned = t, t is not x
                elif in_place and owned:
                    y.add_(t)
                else:
                    y, owned = y + t, True
            outs.append(y.relu_() if in_place and owned else self.relu(y))
        return outs


class HRNet(nn.Module):
    """HRNetV2p backbone.

    Args:
        arch: ``"w18_small"``, ``"w18"``, ``"w48"`` or a tuple of four :class:`StageSpec`.
        in_channels: image channels.
        with_cp: activation checkpointing in training (:mod:`ocrnet.models.recompute`): the
            stem, each block of stage 1, each transition and each HRModule (its branches and
            fuse layers together) keep only their inputs for backward and run again there.
            The same loss, gradients and BatchNorm running statistics as without; no effect
            in eval mode or without autograd. May be changed at any time.

    Input (B, in_channels, H, W); output: the list of the four branch outputs,
    branch i of shape (B, C_i, H / 2^(i+2), W / 2^(i+2)) with C = (18, 36, 72, 144) for W18 and
    W18-Small, (48, 96, 192, 384) for W48 (sizes rounded up by the strided convolutions).
    """

    def __init__(self, arch: str | tuple[StageSpec, ...] = "w18", in_channels: int = 3,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        stages = hrnet_arch(arch) if isinstance(arch, str) else tuple(arch)
        if len(stages) != 4 or stages[0].num_branches != 1:
            raise ValueError("HRNet: arch needs four stages, the first with one branch")
        self.stages_spec = stages
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        s1 = stages[0]
        block1 = _BLOCKS[s1.block]
        self.layer1 = make_res_layer(block1, 64, s1.num_channels[0], s1.num_blocks[0])
        pre = [s1.num_channels[0] * block1.expansion]
        for k, spec in enumerate(stages[1:], start=1):
            block = _BLOCKS[spec.block]
            cur = [c * block.expansion for c in spec.num_channels]
            self.add_module(f"transition{k}", self._make_transition(pre, cur))
            # Every module of a stage sees the transition's widths (the blocks keep them).
            modules = [HRModule(block, spec.num_blocks, cur, spec.num_channels)
                       for _ in range(spec.num_modules)]
            self.add_module(f"stage{k + 1}", nn.Sequential(*modules))
            pre = cur
        self.out_channels: list[int] = list(pre)

    @staticmethod
    def _make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
        """Branch i < len(pre): 3x3 conv-BN-ReLU if its width changes, else None (identity).
        A new branch: stride-2 3x3 conv-BN-ReLU from the lowest-resolution previous branch."""
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(_conv_bn(pre[i], c, 3, relu=True) if c != pre[i] else None)
            else:
                steps = []
                for k in range(i + 1 - len(pre)):
                    out = c if k == i - len(pre) else pre[-1]
                    steps.append(_conv_bn(pre[-1], out, 3, stride=2, relu=True))
                layers.append(nn.Sequential(*steps))
        return layers

    def _stem(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    @staticmethod
    def _transition(transition: nn.ModuleList, *ys: Tensor) -> list[Tensor]:
        xs = []
        for i, t in enumerate(transition):
            if t is None:
                xs.append(ys[i])
            elif i < len(ys):
                xs.append(t(ys[i]))
            else:
                # New branches grow from the lowest-resolution branch.
                xs.append(t(ys[-1]))
        return xs

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C_in, H, W) -> list of the four branch outputs (see the class docstring)."""
        cp = self.with_cp and self.training
        x = checkpoint_call(self._stem, x, enabled=cp, batchnorms=(self.bn1, self.bn2))
        for block in self.layer1:
            x = checkpoint_call(block, x, enabled=cp, batchnorms=block)
        ys = [x]
        for k in range(1, 4):
            transition = getattr(self, f"transition{k}")
            ys = checkpoint_call(self._transition, transition, *ys, enabled=cp,
                                 batchnorms=transition)
            for module in getattr(self, f"stage{k + 1}"):
                ys = checkpoint_call(lambda *b, m=module: m(list(b)), *ys, enabled=cp,
                                     batchnorms=module)
        return ys
