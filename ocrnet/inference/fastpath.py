"""The inference fast path: BatchNorm folded into the convolutions, the fused OCR head, and
:func:`inference`, image in, label map out.

    model = ocrnet.init_model("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", "mmseg.pth")
    fast = ocrnet.prepare_for_inference(model)       # an eval-mode copy; ``model`` is untouched
    labels = ocrnet.inference(fast, "frankfurt.png")  # (H, W) int64 class ids

What :func:`prepare_for_inference` changes, and why it is exact in eval mode:

* every conv -> BatchNorm pair of the backbone and of both heads becomes one conv with bias.
  In eval mode BN is the per-channel affine map ``y = (x - mean) * g / sqrt(var + eps) + b``,
  so ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b_conv - mean) * s + b``,
  ``s = g / sqrt(var + eps)``: the same function up to fp32 rounding (the folded parameters are
  computed in float64), with one memory-bound pass over each feature map fewer;
* the OCR head's object-attention block keeps its BatchNorms: its fused kernel folds them
  itself (and reads ``bn`` of each CBR); its 3x3 ``bottleneck`` CBR is folded like the rest;
* the OCR head runs its fused kernels (``fused=True``);
* the heads' 1x1 convolutions (the auxiliary head's, the classifier) run as ocrkernels' pixel
  matmul on the CPU (:class:`PointwiseConv`): the same products in another order;
* the heads' 3x3 conv-ReLU blocks (the OCR head's bottleneck) run as Winograd F(4x4, 3x3)
  (:mod:`ocrkernels.winograd`): the same function with about 1e-5 relative rounding error
  instead of 1e-7, and a third of the multiplications;
* on CPU the backbone runs in channels_last (NHWC) memory format and hands contiguous maps to
  the heads: oneDNN's convolutions are faster in NHWC, while the heads (the fused OCR core reads
  NCHW) are faster contiguous; the whole model is fastest with that split (the measurements are
  in docs/PERFORMANCE.md, "Measurements formerly in docstrings");
* on CPU in channels_last, every backbone convolution runs as a oneDNN convolution with its
  ReLU and residual sum fused in and its weight prepacked once per input shape
  (:mod:`.fused_convs`);
* on CPU, glibc keeps freed blocks for reuse (``keep_memory``,
  :func:`ocrnet.utils.memory.keep_freed_memory`): not a change to the model, but the fresh,
  zero-filled pages of every large feature map were a third of a forward's time.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocrkernels import backends
from ocrkernels.batchnorm import fold_into_conv
from ocrkernels.modules import ConvBNReLU, ObjectAttention
from ocrkernels.winograd import WinogradConv2d, winograd_applies

from ..configs.schema import IMAGENET_MEAN, IMAGENET_STD
from ..utils.memory import keep_freed_memory
from .fused_convs import fuse_backbone, fusion_available
from ..models.hrnet import HRNet
from ..models.resnet import BasicBlock, Bottleneck
from ..models.segmentor import OCRNet

__all__ = ["fold_batchnorm", "inference", "is_prepared", "normalise", "prepare_for_inference"]

# Attribute set on the copies made by prepare_for_inference.
_PREPARED = "_ocrnet_fastpath"

# (module type, ((conv attribute, bn attribute), ...)): pairs where the BN directly follows
# the conv in the forward pass (attribute order alone would not prove that).
_NAMED_PAIRS: tuple[tuple[type[nn.Module], tuple[tuple[str, str], ...]], ...] = (
    (ConvBNReLU, (("conv", "bn"),)),
    (BasicBlock, (("conv1", "bn1"), ("conv2", "bn2"))),
    (Bottleneck, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))),
    (HRNet, (("conv1", "bn1"), ("conv2", "bn2"))),
)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A new conv with bias equal to ``bn(conv(x))`` for BN in eval mode.

    conv weight (O, I/groups, kh, kw), bn over O channels. The arithmetic runs in float64 so
    that the folded parameters carry no more than one fp32 rounding each.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: a BatchNorm without running statistics "
                         "(track_running_stats=False) cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_batchnorm: BatchNorm of {bn.num_features} channels after a conv "
                         f"of {conv.out_channels} output channels")

    dtype = conv.weight.dtype
    weight, bias = fold_into_conv(conv.weight, bn, dtype, conv.bias)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True,
                       padding_mode=conv.padding_mode, device=conv.weight.device, dtype=dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded


def _pairs(module: nn.Module) -> Iterator[tuple[str, str]]:
    """(conv attribute, bn attribute) pairs of ``module`` whose BN directly follows the conv."""
    for kind, pairs in _NAMED_PAIRS:
        if isinstance(module, kind):
            yield from pairs
    if isinstance(module, nn.Sequential):
        # In a Sequential, registration order is execution order.
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            if (isinstance(module._modules[a], nn.Conv2d)
                    and isinstance(module._modules[b], nn.modules.batchnorm._BatchNorm)):
                yield a, b


def fold_batchnorm(model: nn.Module, skip: tuple[type[nn.Module], ...] = (ObjectAttention,)
                   ) -> int:
    """Fold, in place, every conv -> BatchNorm pair of ``model`` (see :data:`_NAMED_PAIRS` and
    consecutive pairs in ``nn.Sequential``) into one conv with bias; the BN becomes
    ``nn.Identity``. Modules of the ``skip`` types are left whole (the fused object-attention
    kernel folds its BNs itself). Only valid for inference in eval mode.

    Returns:
        the number of pairs folded.
    """
    if model.training:
        raise ValueError("fold_batchnorm: model must be in eval mode (training-mode BatchNorm "
                         "uses batch statistics, which cannot be folded)")
    count = 0
    stack = [model]
    while stack:
        module = stack.pop()
        if isinstance(module, skip):
            continue
        for conv_name, bn_name in list(_pairs(module)):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(bn, nn.Identity):  # already folded
                continue
            if not isinstance(conv, nn.Conv2d) or not isinstance(
                    bn, nn.modules.batchnorm._BatchNorm):
                raise TypeError(f"fold_batchnorm: expected Conv2d -> BatchNorm at "
                                f"{type(module).__name__}.{conv_name}/{bn_name}, got "
                                f"{type(conv).__name__} -> {type(bn).__name__}")
            setattr(module, conv_name, _fold_pair(conv, bn))
            setattr(module, bn_name, nn.Identity())
            count += 1
        stack.extend(module.children())
    return count


class _ChannelsLastBackbone(nn.Module):
    """Runs the wrapped backbone in channels_last (NHWC) memory format and hands its outputs
    back contiguous (NCHW), where the heads run faster (measured; see the module docstring).
    Outputs no head reads (``used``: the indices the heads read, None for all) stay
    channels_last: the same values, without the transposing copy (ResNet-D8's two first stages,
    a quarter of its copies)."""

    def __init__(self, backbone: nn.Module, used: set[int] | None = None):
        super().__init__()
        # Weights in channels_last too, so oneDNN need not reorder them on every call.
        self.inner = backbone.to(memory_format=torch.channels_last)
        self.used = None if used is None else frozenset(used)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = list(self.inner(x.contiguous(memory_format=torch.channels_last)))
        n = len(outs)
        return [o.contiguous() if self.used is None or i in self.used or i - n in self.used
                else o for i, o in enumerate(outs)]


class PointwiseConv(nn.Module):
    """A folded 1x1 convolution of a head (stride 1, no groups, no padding), optionally with its
    ReLU, as the ``ocrkernels::pixel_matmul`` kernel where ``ocrkernels.backends`` says it runs
    (float32 CPU maps), else as the convolution: (B, C, H, W) -> (B, O, H, W). On the CPU, on
    NCHW maps of the heads' shapes, that kernel is 2-6x faster than the 1x1 convolution (the
    OCRNet auxiliary head's 270 -> 270 and 270 -> K, the classifier's 512 -> K;
    docs/PERFORMANCE.md). Bias and ReLU take one more pass over the product, in place (the
    ``bn_relu_inplace`` kernel with mean 0 and scale 1 computes exactly ``relu(z + bias)``)."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach().clone(), requires_grad=False))
        self.relu = relu
        if relu and self.bias is not None:  # bn_relu_inplace's mean 0 and scale 1, made once
            self.register_buffer("_zeros", torch.zeros_like(self.bias), persistent=False)
            self.register_buffer("_ones", torch.ones_like(self.bias), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not backends.compiled_pixel_matmul(x) or backends.reference_forced():
            y = F.conv2d(x, self.weight[:, :, None, None], self.bias)
            return F.relu(y) if self.relu else y
        b, c, h, w = x.shape
        out = torch.ops.ocrkernels.pixel_matmul(self.weight, x.reshape(b, c, h * w))
        if self.relu and self.bias is not None:
            torch.ops.ocrkernels.bn_relu_inplace(out, self._zeros, self._ones, self.bias)
        elif self.bias is not None:
            out = out.add_(self.bias[:, None])
        if self.relu and self.bias is None:
            out = out.relu_()
        return out.view(b, -1, h, w)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, relu={self.relu}"


def _pointwise_heads(model: OCRNet) -> None:
    """Replace the 1x1 convolutions of the auxiliary head and the OCR head's classifier (with
    the ReLU of their folded conv-BN-ReLU block, where they have one) by
    :class:`PointwiseConv`. (The object-attention block runs its own kernel; the backbone's 1x1
    convolutions run channels_last, where oneDNN is fast.)"""
    def is_pointwise(conv: nn.Module) -> bool:
        return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
                and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0))

    for head in (model.aux_head, model.ocr_head):
        replaced: list[str] = ["object_context_block"]
        for name, module in list(head.named_modules()):
            if any(name.startswith(prefix + ".") or name == prefix for prefix in replaced):
                continue
            if (isinstance(module, ConvBNReLU) and isinstance(module.bn, nn.Identity)
                    and is_pointwise(module.conv)):
                replacement = PointwiseConv(module.conv, relu=True)
            elif is_pointwise(module):
                replacement = PointwiseConv(module)
            else:
                continue
            replaced.append(name)
            parent, _, attr = name.rpartition(".")
            setattr(head.get_submodule(parent) if parent else head, attr, replacement)


def _winograd_heads(model: OCRNet) -> None:
    """Replace the heads' folded 3x3 conv-ReLU blocks (the OCR head's bottleneck, ResNet
    models' auxiliary 3x3 conv) by :class:`~ocrkernels.winograd.WinogradConv2d`: about a third
    of the direct convolution's time on the CPU at these widths (docs/PERFORMANCE.md)."""
    for head in (model.aux_head, model.ocr_head):
        for name, block in list(head.named_modules()):
            if (isinstance(block, ConvBNReLU) and isinstance(block.bn, nn.Identity)
                    and winograd_applies(block.conv)
                    and not name.startswith("object_context_block")):
                parent, _, attr = name.rpartition(".")
                setattr(head.get_submodule(parent) if parent else head, attr,
                        WinogradConv2d(block.conv, relu=True))


def prepare_for_inference(model: OCRNet, channels_last: bool | None = None,
                          keep_memory: bool = True) -> OCRNet:
    """An inference copy of ``model`` (which is not modified): eval mode, parameters frozen,
    every backbone and head conv -> BatchNorm pair folded (the object-attention block excepted,
    which its fused kernel folds), the heads' 1x1 convolutions as :class:`PointwiseConv`, the
    fused OCR kernels switched on.

    Args:
        model: an :class:`~ocrnet.models.segmentor.OCRNet` (any mode).
        channels_last: run the backbone in channels_last memory format (the heads stay
            contiguous). ``None`` (default): on CPU only, where it was measured faster (see the
            module docstring); ``True`` / ``False`` force it.
        keep_memory: for a model on the CPU, ask the C library to keep freed feature maps for
            the next forward (:func:`ocrnet.utils.memory.keep_freed_memory`: process-wide,
            resident memory stays at its peak; a third faster on 2 cores). ``False`` leaves
            the allocator as it is.

    Returns:
        the prepared copy; ``copy(img)`` maps a normalised (B, 3, H, W) image to (B, K, H, W)
        logits like ``model`` in eval mode, up to fp32 rounding. Meant to run under
        ``torch.no_grad()`` (the fused eval kernel only runs without autograd). Its state dict
        differs (no BN keys, conv biases, ``backbone.inner.*`` with channels_last): save the
        original model, not this copy.
    """
    if not isinstance(model, OCRNet):
        raise TypeError(f"prepare_for_inference: model must be an ocrnet OCRNet, got "
                        f"{type(model).__name__}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"prepare_for_inference: channels_last must be None or a bool, got "
                        f"{channels_last!r}")
    if is_prepared(model):
        if channels_last is None or channels_last == _runs_channels_last(model):
            return model
        raise ValueError("prepare_for_inference: model is already prepared with channels_last="
                         f"{_runs_channels_last(model)}; prepare the original model instead")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if channels_last is None:
        channels_last = on_cpu
    if keep_memory and on_cpu:
        keep_freed_memory()
    fast = copy.deepcopy(model).eval()
    fold_batchnorm(fast)
    _pointwise_heads(fast)
    _winograd_heads(fast)
    for p in fast.parameters():  # after folding, which makes new parameters
        p.requires_grad_(False)
    fast.fused = True
    if channels_last:
        if on_cpu and fusion_available():
            fuse_backbone(fast.backbone)
        used = (None if fast.input_transform == "resize_concat"
                else {fast.aux_in_index, fast.ocr_in_index})
        fast.backbone = _ChannelsLastBackbone(fast.backbone, used)
    setattr(fast, _PREPARED, True)
    return fast


def _runs_channels_last(model: OCRNet) -> bool:
    return isinstance(model.backbone, _ChannelsLastBackbone)


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` came from :func:`prepare_for_inference`."""
    return bool(getattr(model, _PREPARED, False))


# --------------------------------------------------------------------------------------------
# Image in, label map out
# --------------------------------------------------------------------------------------------

def _load_image(path: str | os.PathLike) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a ``.npy`` file or an image file.

    Image files are decoded with OpenCV as mmcv's ``LoadImageFromFile`` does (BGR, then
    reversed to RGB like the data preprocessor's ``bgr_to_rgb``); without OpenCV, with Pillow.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"inference: image file {name!r} does not exist")
    suffix = os.path.splitext(name)[1].lower()
    if suffix == ".npy":
        return np.load(name, allow_pickle=False)
    if suffix not in _IMAGE_SUFFIXES:
        raise ValueError(f"inference: image {name!r} has an unknown suffix {suffix!r}; expected "
                         f".npy or one of {', '.join(_IMAGE_SUFFIXES)}")
    try:
        from ..data.io import read_image  # needs OpenCV (cv2)
    except ImportError:
        read_image = None
    if read_image is not None:
        return np.ascontiguousarray(read_image(name)[:, :, ::-1])
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"inference: reading {suffix} files ({name!r}) needs OpenCV "
                          "(`pip install opencv-python-headless`) or Pillow; without them pass "
                          "an (H, W, 3) uint8 RGB numpy array or a .npy file") from None
    with Image.open(name) as im:
        return np.asarray(im.convert("RGB"))


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"inference: image must be a path or a numpy array, got "
                        f"{type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"inference: image must have shape (H, W, 3) (RGB, channels last), "
                         f"got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"inference: image must have dtype uint8 (0..255 RGB), got "
                         f"{image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"inference: image must not be empty, got shape {image.shape}")
    return image


def normalise(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD,
              device: str | torch.device = "cpu") -> Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 ``(x - mean) / std``, per RGB channel, as
    mmsegmentation's ``SegDataPreProcessor`` (``bgr_to_rgb=True`` on BGR-loaded images)."""
    x = torch.from_numpy(np.ascontiguousarray(_check_image(image))).to(device)
    x = x.permute(2, 0, 1).unsqueeze(0).float()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def inference(model: OCRNet, image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Segment one image: normalise, whole-image inference, argmax.

    Args:
        model: an OCRNet; when it is not already a :func:`prepare_for_inference` copy, one is
            made for this call (call ``prepare_for_inference`` once to reuse it).
        image: an (H, W, 3) uint8 RGB numpy array, or the path of a ``.npy`` file holding one,
            or of a PNG/JPEG image (decoded with OpenCV as mmcv does, else Pillow). The image
            runs at its own size (resize it first to the config's test scale to follow mmseg's
            test pipeline exactly); the mean and std are the model config's (mmseg's ImageNet
            values, RGB, by default).

    Returns:
        (H, W) int64 numpy array of class ids in ``[0, num_classes)``.
    """
    if not isinstance(model, OCRNet):
        raise TypeError(f"inference: model must be an ocrnet OCRNet, got {type(model).__name__}")
    if isinstance(image, (str, os.PathLike)):
        image = _load_image(image)
    image = _check_image(image)
    fast = prepare_for_inference(model)
    data = fast.config.data if fast.config is not None else None
    mean = data.mean if data is not None else IMAGENET_MEAN
    std = data.std if data is not None else IMAGENET_STD
    param = next(fast.parameters())
    x = normalise(image, mean, std, param.device).to(param.dtype)
    with torch.no_grad():
        logits = fast(x)  # (1, K, H, W), already resized to the input
    return logits[0].argmax(0).cpu().numpy().astype(np.int64, copy=False)
