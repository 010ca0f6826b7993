"""The OCRNet cascade segmentor (mmsegmentation's ``CascadeEncoderDecoder`` with two heads).

State-dict layout: ``backbone.*``, ``decode_head.0.*`` (auxiliary FCN head) and
``decode_head.1.*`` (OCR head), the same keys as a mmsegmentation OCRNet checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..configs import Config, ModelConfig, get_config
from .heads import FCNHead, OCRHead
from .hrnet import HRNet
from .losses import cross_entropy, resize_logits
from .recompute import checkpoint_call
from .resnet import BasicBlock, Bottleneck, ResNetV1c

__all__ = ["OCRNet", "build_backbone", "build_segmentor", "count_parameters"]


class OCRNet(nn.Module):
    """backbone -> auxiliary FCN head (coarse logits) -> OCR head (final logits).

    Args:
        backbone: returns a list of feature maps.
        aux_head: (B, C_aux, h, w) -> (B, K, h, w).
        ocr_head: ``(feats (B, C_ocr, h, w), coarse_logits (B, K, h, w)) -> (B, K, h, w)``.
        input_transform: ``"resize_concat"``: all backbone outputs are resized (bilinear) to the
            first one's size and concatenated, once, for both heads; ``"select"``: the heads
            read backbone outputs ``aux_in_index`` and ``ocr_in_index``.
        align_corners: of every bilinear resize (False in all published configs).
        ignore_index, avg_non_ignore: loss settings, see :mod:`ocrnet.models.losses`.
        loss_weights: (auxiliary, OCR) loss weights.
        recompute: training keeps less for backward and recomputes it there (exact: the same
            loss, gradients and BatchNorm running statistics): the OCR head's object attention
            keeps only its bottleneck's pre-activation (ocrkernels' ``recompute``), and the
            auxiliary head and the loss (the logits resized to the labels, their softmax) keep
            only their inputs. See :attr:`recompute`; the backbone's counterpart is its
            ``with_cp``.
    """

    def __init__(self, backbone: nn.Module, aux_head: nn.Module, ocr_head: nn.Module,
                 input_transform: str = "resize_concat", aux_in_index: int = -1,
                 ocr_in_index: int = -1, align_corners: bool = False, ignore_index: int = 255,
                 avg_non_ignore: bool = False, loss_weights: tuple[float, float] = (0.4, 1.0),
                 recompute: bool = False):
        super().__init__()
        if input_transform not in ("resize_concat", "select"):
            raise ValueError(f"OCRNet: input_transform must be 'resize_concat' or 'select', "
                             f"got {input_transform!r}")
        self.backbone = backbone
        self.decode_head = nn.ModuleList([aux_head, ocr_head])
        self.input_transform = input_transform
        self.aux_in_index = aux_in_index
        self.ocr_in_index = ocr_in_index
        self.align_corners = align_corners
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.loss_weights = tuple(loss_weights)
        self.recompute = recompute
        self.config: Config | None = None  # set by build_segmentor

    @property
    def aux_head(self) -> nn.Module:
        return self.decode_head[0]

    @property
    def ocr_head(self) -> nn.Module:
        return self.decode_head[1]

    @property
    def num_classes(self) -> int:
        return self.ocr_head.num_classes

    @property
    def fused(self) -> bool:
        return bool(getattr(self.ocr_head, "fused", False))

    @fused.setter
    def fused(self, value: bool) -> None:
        """Switch the OCR head between the fused kernels and the reference (same weights)."""
        self.ocr_head.fused = bool(value)

    @property
    def recompute(self) -> bool:
        return self._recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        """The heads' recompute in training (see the class docstring); any time."""
        self._recompute = bool(value)
        attention = getattr(self.ocr_head, "object_context_block", None)
        if attention is not None and hasattr(attention, "recompute"):
            attention.recompute = self._recompute

    @property
    def with_cp(self) -> bool:
        """The backbone's activation checkpointing (False for a backbone without it)."""
        return bool(getattr(self.backbone, "with_cp", False))

    @with_cp.setter
    def with_cp(self, value: bool) -> None:
        if not hasattr(self.backbone, "with_cp"):
            raise ValueError(f"OCRNet: the backbone {type(self.backbone).__name__} has no "
                             "with_cp")
        self.backbone.with_cp = bool(value)

    def extract_features(self, img: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised image -> the backbone's list of feature maps."""
        if img.dim() != 4:
            raise ValueError(f"OCRNet: img must have shape (B, C, H, W), got {tuple(img.shape)}")
        return list(self.backbone(img))

    def _head_inputs(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.input_transform == "select":
            return features[self.aux_in_index], features[self.ocr_in_index]
        size = features[0].shape[-2:]
        cat = torch.cat([resize_logits(f, size, self.align_corners) for f in features], dim=1)
        return cat, cat

    def decode(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Backbone features -> (aux_logits, ocr_logits), both (B, K, h, w) at the feature
        resolution (1/4 of the input for HRNet, 1/8 for ResNet-D8). The OCR head's coarse
        logits are the auxiliary logits themselves (not detached, as in mmseg)."""
        aux_in, ocr_in = self._head_inputs(features)
        aux_logits = checkpoint_call(self.aux_head, aux_in,
                                     enabled=self.recompute and self.training,
                                     batchnorms=self.aux_head)
        return aux_logits, self.ocr_head(ocr_in, aux_logits)

    def forward(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) normalised image -> (B, K, H, W) OCR logits resized to the input."""
        _, ocr_logits = self.decode(self.extract_features(img))
        return resize_logits(ocr_logits, img.shape[-2:], self.align_corners)

    def loss(self, img: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Training losses for a batch.

        Args:
            img: (B, 3, H, W) normalised images.
            labels: (B, H', W') class indices, ``ignore_index`` for unlabelled pixels. The
                logits are upsampled bilinearly to (H', W') before the loss (as mmseg does).

        Returns:
            ``{"loss_aux": 0.4 * CE(aux), "loss_ocr": 1.0 * CE(ocr), "loss": their sum}`` (mmseg
            logs the first two as ``decode_0.loss_ce`` / ``decode_1.loss_ce``).
        """
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.dim() != 3 or labels.shape[0] != img.shape[0]:
            raise ValueError(f"OCRNet.loss: labels must have shape (B={img.shape[0]}, H, W), "
                             f"got {tuple(labels.shape)}")
        aux_logits, ocr_logits = self.decode(self.extract_features(img))
        kw = dict(ignore_index=self.ignore_index, avg_non_ignore=self.avg_non_ignore,
                  align_corners=self.align_corners)

        def ce(logits: Tensor) -> Tensor:
            return cross_entropy(logits, labels, **kw)

        # With recompute only the low-resolution logits are kept; the resize to the labels'
        # size and the softmax run again in backward.
        loss_aux, loss_ocr = (
            w * checkpoint_call(ce, logits, enabled=self.recompute and self.training)
            for w, logits in zip(self.loss_weights, (aux_logits, ocr_logits)))
        return {"loss_aux": loss_aux, "loss_ocr": loss_ocr, "loss": loss_aux + loss_ocr}

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmseg's random initialisation (used without ImageNet weights): Kaiming-normal
        (fan_out, ReLU) convolutions with zero bias, BatchNorm weight 1 / bias 0, classifiers
        N(0, 0.01); ResNet blocks start with their last BN at 0 (zero_init_residual)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in self.decode_head:
            nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
            nn.init.zeros_(head.conv_seg.bias)
        if isinstance(self.backbone, ResNetV1c):
            for m in self.backbone.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, list[int]]:
    """The backbone of ``cfg`` and the channel counts of its outputs."""
    bb = cfg.backbone
    if bb.type == "HRNet":
        net = HRNet(bb.arch, with_cp=bb.with_cp)
    elif bb.type == "ResNetV1c":
        net = ResNetV1c(bb.depth, strides=bb.strides, dilations=bb.dilations,
                        contract_dilation=bb.contract_dilation, with_cp=bb.with_cp)
    else:  # BackboneConfig validates the type; kept for hand-made configs
        raise ValueError(f"build_backbone: unknown backbone type {bb.type!r}")
    return net, list(net.out_channels)


def build_segmentor(config: str | Config | ModelConfig, fused: bool = True,
                    init: bool = True) -> OCRNet:
    """Build the OCRNet of a config (name, :class:`Config` or :class:`ModelConfig`).

    Args:
        fused: the OCR head's kernels (``False``: the plain-PyTorch reference).
        init: apply :meth:`OCRNet.init_weights` (skipped on the "meta" device, where there is
            nothing to initialise).

    The model is in training mode, on the current default device (``with torch.device("meta"):
    build_segmentor(...)`` builds it without allocating memory).
    """
    cfg = config if isinstance(config, ModelConfig) else get_config(config).model
    backbone, widths = build_backbone(cfg)
    if cfg.input_transform == "resize_concat":
        aux_in = ocr_in = sum(widths)
    else:
        aux_in, ocr_in = widths[cfg.aux_in_index], widths[cfg.ocr_in_index]
    a, o = cfg.aux_head, cfg.ocr_head
    if a.in_channels != aux_in or o.in_channels != ocr_in:
        raise ValueError(f"build_segmentor: head in_channels ({a.in_channels}, {o.in_channels})"
                         f" do not match the backbone's ({aux_in}, {ocr_in})")
    aux_head = FCNHead(aux_in, a.channels, cfg.num_classes, a.num_convs, a.kernel_size,
                       max(a.dropout_ratio, 0.0))
    ocr_head = OCRHead(ocr_in, cfg.num_classes, channels=o.channels,
                       ocr_channels=o.ocr_channels, dropout_ratio=max(o.dropout_ratio, 0.0),
                       fused=fused)
    model = OCRNet(backbone, aux_head, ocr_head, cfg.input_transform, cfg.aux_in_index,
                   cfg.ocr_in_index, cfg.align_corners, cfg.ignore_index, cfg.avg_non_ignore,
                   (a.loss_weight, o.loss_weight), cfg.recompute)
    if not isinstance(config, ModelConfig):
        model.config = get_config(config)
    if init and next(model.parameters()).device.type != "meta":
        model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN running statistics excluded)."""
    return sum(math.prod(p.shape) for p in model.parameters())

