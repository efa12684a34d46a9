"""The `quality` protocol of `vk.bench`: feature-quality columns that need no training.

* `locality`: ConViT's non-locality, the mean attention distance in patches (`vitkit.explain.locality`), averaged
  over heads and blocks, with every head's value in `locality_heads`; timm VisionTransformers and ConViT only
  (other backbones have no global attention map: the row says so in `locality_note`).
* `overlap` / `overlap_auroc`: MMC's intra- vs inter-object similarity overlap (`vk.similarity_overlap`) on 2x2
  mosaics of the task's evaluation images (each quadrant one object), on dense features: a ViT's final-norm patch
  tokens; for other timm models the deepest `forward_intermediates` map with at least 4x4 positions (a quadrant
  needs two positions or more), recorded in `overlap_features`.

Lower overlap and higher AUROC: patch features that separate objects. Hand-written: the mosaic set-up and the
feature choice; the metrics are vitkit's own (explain/locality.py, explain/segment.py). Docs: docs/backbones.md.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

MIN_GRID = 4


def dense_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(B, C, gh, gw) dense features of `x` and which ones they are."""
    from timm.models.vision_transformer import VisionTransformer

    from vitkit.explain.segment import patch_features

    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            f = patch_features(model, x)
            return f, f"final-norm patch tokens {f.shape[-2]}x{f.shape[-1]}"
        maps = model.forward_intermediates(x, intermediates_only=True)
    deep = [i for i, m in enumerate(maps) if m.ndim == 4 and min(m.shape[-2:]) >= MIN_GRID]
    if not deep:
        raise NotImplementedError(f"overlap: no feature map of {type(model).__name__} has {MIN_GRID}x{MIN_GRID} "
                                  f"positions at this input size (grids {[tuple(m.shape[-2:]) for m in maps]})")
    i = deep[-1]
    return maps[i], f"forward_intermediates {i + 1} of {len(maps)}, {maps[i].shape[-2]}x{maps[i].shape[-1]}"


def mosaics(model: nn.Module, images: list, data: dict, seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` normalised 2x2 mosaics (B, C, H, W) of the model's input size and their quadrant labels
    (B, H, W), from PIL `images` drawn in a seeded order (so quadrants mix classes)."""
    import vitkit as vk
    from vitkit.explain import scenes

    cfg = vk.data.data_config(model, **data)
    c, h, w = cfg["input_size"]
    if h != w or h % 2 or c != 3:
        raise NotImplementedError(f"overlap: mosaics need a square RGB input of even size, got {cfg['input_size']}")
    order = np.random.default_rng(seed).permutation(len(images))[:4 * n]
    if len(order) < 4:
        raise ValueError(f"overlap: needs at least 4 evaluation images, got {len(images)}")
    quads = [np.asarray(images[i].convert("RGB").resize((h // 2, h // 2), Image.BILINEAR)) for i in order]
    pixels, labels, _ = scenes.mosaics(quads)
    return scenes.to_tensor(pixels, cfg["mean"], cfg["std"]), torch.from_numpy(labels)


def quality(model: nn.Module, images: list, data: dict, seed: int) -> dict:
    """The row fields of a `quality` cell (see the module docstring)."""
    from vitkit.explain.locality import attention_locality
    from vitkit.explain.segment import similarity_overlap

    model.eval()
    x, labels = mosaics(model, images, data, seed)
    row: dict = {"n_mosaics": len(x)}
    try:
        per_block = attention_locality(model, x)
        row.update(locality=float(torch.cat(list(per_block.values())).mean()),
                   locality_heads={str(i): v.tolist() for i, v in per_block.items()})
    except NotImplementedError as why:
        row.update(locality=None, locality_note=str(why))
    try:
        feats, what = dense_features(model, x)
        result = similarity_overlap(model, x, labels, features=lambda _: feats)
        row.update(overlap=result.overlap, overlap_auroc=result.auroc, overlap_features=what)
    except NotImplementedError as why:
        row.update(overlap=None, overlap_auroc=None, overlap_note=str(why))
    return row
