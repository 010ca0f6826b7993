"""The model and data of the SyncBatchNorm test, shared by the torchrun script and the test."""

from __future__ import annotations

import torch

import ocrkernels
from test_modules import randomise_batchnorm

PER_RANK = 2
# fused keeping the activations, fused recomputing them, the plain-PyTorch reference
MODES = ("fused", "recompute", "reference")
C_IN, K, H, W = 24, 5, 9, 11


def make_head() -> ocrkernels.OCRHead:
    torch.manual_seed(0)
    head = ocrkernels.OCRHead(C_IN, K, channels=32, ocr_channels=16)
    randomise_batchnorm(head)
    return head


def make_batch(world: int):
    """The global batch: (feats, coarse logits, labels with some 255s); rank r owns rows
    [r * PER_RANK, (r + 1) * PER_RANK). Ranks get different statistics on purpose."""
    g = torch.Generator().manual_seed(2)
    n = world * PER_RANK
    shift = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    feats = torch.randn(n, C_IN, H, W, generator=g) * (1 + shift) + shift
    coarse = torch.randn(n, K, H, W, generator=g) * 3
    labels = torch.randint(0, K, (n, H, W), generator=g)
    labels[torch.rand(n, H, W, generator=g) < 0.1] = 255
    return feats, coarse, labels


def snapshot(head, out, feats_grad, grads, second) -> dict:
    return {"out": out.detach().clone(), "feats_grad": feats_grad.clone(), "grads": grads,
            "params": {n: p.detach().clone() for n, p in head.named_parameters()},
            "buffers": {n: b.clone() for n, b in head.named_buffers()},
            "second": second.detach().clone()}
