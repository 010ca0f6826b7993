"""Multi-scale + flip test-time augmentation, as mmsegmentation evaluates its "ms+flip" column.

    from ocrnet.inference.tta import multiscale_flip
    probs = multiscale_flip(model, img_bgr, config)      # (1, K, H, W), softmax averaged
    pred = probs.argmax(1)[0]

What mmsegmentation 1.x does (``tta_pipeline`` of ``configs/_base_/datasets/*.py`` and
``SegTTAModel.merge_preds``), and so what this module does:

* the *raw* image (not the test-scale resize) is resized once per ratio of
  ``TestConfig.tta_ratios`` = 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 with mmcv's
  ``Resize(scale_factor=r, keep_ratio=True)``: target (w, h) = (int(w r + 0.5), int(h r + 0.5)),
  then mmcv's keep-ratio rescale into that box (:func:`tta_sizes`), bilinear (cv2);
* each scale runs unflipped and flipped horizontally (``tta_flip``);
* each pass runs the test mode of the config (whole or sliding window), its logits are
  flipped back, resized bilinearly to the original image size, and turned into
  **probabilities with a softmax**; the prediction is the argmax of the mean of the 12
  probability maps (not of the mean of the logits).

mmsegmentation 0.x (where the published OCRNet models were evaluated) scaled the *config's
test scale* instead: ``MultiScaleFlipAug(img_scale=(2048, 1024), img_ratios=...)`` gives
boxes (int(2048 r), int(1024 r)) and a keep-ratio resize into them; it also averaged softmax
probabilities. For Cityscapes (2048x1024 images, test scale 2048x1024) both give the same
sizes; for ADE20K and VOC (test scale 2048x512, images of other sizes) they differ:
``relative_to="scale"`` reproduces 0.x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data import build_collate
from ..data.transforms import Resize, rescale_size
from .predict import predict_logits, resize_for

__all__ = ["multiscale_flip", "tta_sizes"]


def tta_sizes(hw: tuple[int, int], ratios: Sequence[float],
              scale: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """The (h, w) each ratio resizes an image of size ``hw`` = (h, w) to.

    ``scale`` None: mmseg 1.x, the ratio of the image's own size; ``scale`` = the config's test
    scale (long, short): mmseg 0.x, the ratio of that scale as a keep-ratio bound.
    """
    h, w = hw
    sizes = []
    for r in ratios:
        if not r > 0:
            raise ValueError(f"tta_sizes: ratios must be > 0, got {r}")
        if scale is None:
            box = (int(w * r + 0.5), int(h * r + 0.5))  # mmcv's _scale_size
        else:
            box = (int(scale[0] * r), int(scale[1] * r))  # MultiScaleFlipAug truncates
        sizes.append(rescale_size((h, w), box))
    return sizes


@torch.no_grad()
def multiscale_flip(model: nn.Module, image: np.ndarray, config, *, test_cfg=None,
                    ratios: Sequence[float] | None = None, flip: bool | None = None,
                    out_size: tuple[int, int] | None = None, relative_to: str = "image",
                    device: str | torch.device | None = None) -> Tensor:
    """Multi-scale + flip probabilities of one image.

    Args:
        model: ``model(x)`` maps a normalised (B, 3, h, w) image to (B, K, h, w) logits.
        image: the raw (H, W, 3) uint8 **BGR** image (as the datasets yield it).
        config: a :class:`ocrnet.configs.Config` (mean / std; ``config.test`` by default).
        test_cfg: the :class:`ocrnet.configs.TestConfig` to use (mode, ratios, flip, scale).
        ratios, flip: override ``test_cfg.tta_ratios`` / ``test_cfg.tta_flip``.
        out_size: (h, w) of the result (default the image's).
        relative_to: "image" (mmseg 1.x) or "scale" (0.x; ratios of ``test_cfg.scale``).
        device: where to run (default the model's).

    Returns:
        (1, K, h, w) float32: the mean over scales x flips of the softmax of the logits, each
        flipped back and resized to ``out_size`` first.
    """

    if relative_to not in ("image", "scale"):
        raise ValueError(f"multiscale_flip: relative_to must be 'image' or 'scale', got "
                         f"{relative_to!r}")
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            and image.dtype == np.uint8):
        raise ValueError(f"multiscale_flip: image must be (H, W, 3) uint8 BGR, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} "
                         f"{getattr(image, 'shape', '')}")
    test_cfg = test_cfg if test_cfg is not None else config.test
    ratios = tuple(test_cfg.tta_ratios if ratios is None else ratios)
    flip = test_cfg.tta_flip if flip is None else flip
    if not ratios:
        raise ValueError("multiscale_flip: no ratios")
    if device is None:
        param = next(model.parameters(), None)  # parameter-free models run on the CPU
        device = param.device if param is not None else torch.device("cpu")
    h, w = image.shape[:2]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    collate = build_collate(config, "test")
    scale = tuple(test_cfg.scale) if relative_to == "scale" else None
    total: Tensor | None = None
    passes = 0
    for size in tta_sizes((h, w), ratios, scale):
        # keep_ratio=False with scale (w, h): exactly ``size`` (the keep-ratio rounding is
        # already in tta_sizes); cv2 bilinear as mmcv.
        img, _, _ = Resize((size[1], size[0]), keep_ratio=False)(image, None, {})
        x, _, _ = collate([(img, None, {})])
        x = x.to(device)
        for flipped in ((False, True) if flip else (False,)):
            logits = predict_logits(model, x.flip(-1) if flipped else x, test_cfg)
            if flipped:
                logits = logits.flip(-1)  # back before resizing, as mmseg's postprocess
            probs = resize_for(model, logits, out_size).softmax(1)
            total = probs if total is None else total + probs
            passes += 1
    return total / passes
