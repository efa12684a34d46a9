"""Dense prediction from patch-token grids, and its metrics (torch only; the timm side is `dense.py`).

Shapes: B images, D token width, (gh, gw) the patch grid, K outputs (classes or regressed quantities).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def combine(grids: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Patch grids of several blocks `[(B, D, gh, gw)]` -> `(B, n*D, gh, gw)` (`concat`, in the given order) or
    `(B, D, gh, gw)` (`sum`)."""
    return torch.cat(list(grids), 1) if how == "concat" else torch.stack(list(grids)).sum(0)


def per_patch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One linear map per patch (a 1x1 convolution): `(B, C, gh, gw)`, weight `(K, C)` -> `(B, K, gh, gw)`."""
    y = torch.einsum("bchw,kc->bkhw", x, weight)
    return y if bias is None else y + bias[:, None, None]


def upsample(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of per-patch maps `(B, K, gh, gw)` to pixels `(B, K, H, W)` (half-pixel centres)."""
    return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(K, K)` counts, rows the true class, columns the predicted one, over every position of `pred`/`target`."""
    index = target.flatten().long() * num_classes + pred.flatten().long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: torch.Tensor) -> tuple[float, list[Optional[float]]]:
    """(mIoU, per-class IoU): IoU_c = TP / (TP + FP + FN) over the whole set; classes that appear neither in the
    targets nor in the predictions (union 0) are None and left out of the mean."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    per_class = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else float("nan")), per_class


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of class maps `pred` and `target` (same shape) over the classes present in either."""
    return iou_from_confusion(confusion(pred, target, num_classes))[0]


def density(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch density: the fraction of each `patch` x `patch` cell covered by `mask` `(..., H, W)` ->
    `(..., H/patch, W/patch)` in [0, 1]."""
    lead = mask.shape[:-2]
    cells = F.avg_pool2d(mask.float().reshape(-1, 1, *mask.shape[-2:]), patch)
    return cells.reshape(*lead, *cells.shape[-2:])
