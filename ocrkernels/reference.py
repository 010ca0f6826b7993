"""Plain-PyTorch semantics of the OCR core: the ground truth every kernel is tested against.

Shapes: B batch, C pixel-feature channels, D key channels, K classes (regions), H x W pixels,
N = H * W. The functions follow mmsegmentation's SpatialGatherModule and ObjectAttentionBlock
operation by operation, so that published weights give the published outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["spatial_gather", "object_attention"]


def spatial_gather(probs: Tensor, feats: Tensor, scale: float = 1.0) -> Tensor:
    """Class-region vectors from coarse class logits and pixel features.

    Args:
        probs: (B, K, H, W) coarse logits (not yet softmaxed).
        feats: (B, C, H, W) pixel features.
        scale: multiplies the logits before the softmax over the H*W pixels.

    Returns:
        (B, C, K, 1): ``R[b, c, k] = sum_n softmax_n(scale * probs[b, k, n]) * feats[b, c, n]``.
    """
    B, K = probs.shape[:2]
    C = feats.shape[1]
    weights = F.softmax(scale * probs.reshape(B, K, -1), dim=2)  # B, K, N
    pixels = feats.reshape(B, C, -1).permute(0, 2, 1)  # B, N, C
    regions = torch.matmul(weights, pixels)  # B, K, C
    return regions.permute(0, 2, 1).contiguous().unsqueeze(3)


def object_attention(
    feats: Tensor,
    regions: Tensor,
    query_project: Callable[[Tensor], Tensor],
    key_project: Callable[[Tensor], Tensor],
    value_project: Callable[[Tensor], Tensor],
    out_project: Callable[[Tensor], Tensor],
    bottleneck: Callable[[Tensor], Tensor],
    key_channels: int,
) -> Tensor:
    """Pixel-region attention (mmsegmentation's ObjectAttentionBlock with scale 1).

    Args:
        feats: (B, C, H, W) pixel features (the queries).
        regions: (B, C, K, 1) region vectors from :func:`spatial_gather` (keys and values).
        query_project, key_project: C -> D projections (two 1x1 conv-BN-ReLU each).
        value_project: C -> D projection (one 1x1 conv-BN-ReLU).
        out_project: D -> C projection of the attended context (1x1 conv-BN-ReLU).
        bottleneck: 2C -> C 1x1 conv-BN-ReLU over ``cat([context, feats], dim=1)``.
        key_channels: D, for the ``D ** -0.5`` scaling of the similarities.

    Returns:
        (B, C, H, W) object-contextual representations.
    """
    B, _, H, W = feats.shape
    query = query_project(feats).flatten(2).permute(0, 2, 1)  # B, N, D
    key = key_project(regions).flatten(2)  # B, D, K
    value = value_project(regions).flatten(2).permute(0, 2, 1)  # B, K, D
    sim = torch.matmul(query, key) * (key_channels ** -0.5)  # B, N, K
    sim = F.softmax(sim, dim=-1)
    context = torch.matmul(sim, value).permute(0, 2, 1).reshape(B, -1, H, W)  # B, D, H, W
    context = out_project(context)
    return bottleneck(torch.cat([context, feats], dim=1))
