"""Merge visualisation from a token method's source map (ToMe paper, Fig. 4 style): each input patch is painted
with the mean colour of all patches that ended in the same token; dropped patches are painted black."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from vitkit.models.runner import get_runner


def merge_groups(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Run `model` on one image (1, C, H, W) and return the (gh, gw) map of final token ids (-1: dropped)."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"merge_groups: expected one image of shape (1, C, H, W), got {tuple(image.shape)}")
    with torch.no_grad():
        model.forward_features(image)
    state = get_runner(model).state
    gh, gw = state.grid
    if state.source is None:
        return torch.arange(gh * gw).reshape(gh, gw) + state.num_prefix_tokens
    return state.source[0].reshape(gh, gw).cpu()


def paint_merges(groups: torch.Tensor, picture: np.ndarray) -> np.ndarray:
    """Paint `picture` (H, W, 3) floats in [0, 1] with the mean colour of each group of patches."""
    gh, gw = groups.shape
    h, w = picture.shape[:2]
    ph, pw = h // gh, w // gw
    patches = picture[:gh * ph, :gw * pw].reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4)
    out = np.zeros_like(patches)
    g = groups.numpy()
    for token in np.unique(g):
        if token < 0:
            continue
        sel = g == token
        out[sel] = patches[sel].mean(axis=(0, 1, 2))
    painted = out.transpose(0, 2, 1, 3, 4).reshape(gh * ph, gw * pw, 3)
    # draw group borders
    edge_v = np.repeat(np.repeat(g[:, 1:] != g[:, :-1], ph, 0), 1, 1)
    for j in range(gw - 1):
        painted[:, (j + 1) * pw - 1][edge_v[:, j]] = 1.0
    edge_h = g[1:] != g[:-1]
    for i in range(gh - 1):
        painted[(i + 1) * ph - 1][np.repeat(edge_h[i], pw)] = 1.0
    return painted


def save_merge_png(model: nn.Module, image: torch.Tensor, path: str | os.PathLike,
                   picture: Optional[np.ndarray] = None) -> np.ndarray:
    """Write a side-by-side PNG (input | merged groups) for one image and return the painted array.

    Args:
        model: a ViT with a token-reduction method applied (its source map is read after the forward).
        image: (1, C, H, W) model input (normalised as the model expects).
        path: PNG file to write.
        picture: (H, W, 3) floats in [0, 1] to paint; defaults to `image` min-max scaled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if picture is None:
        pic = image[0].permute(1, 2, 0).float()
        picture = ((pic - pic.min()) / (pic.max() - pic.min()).clamp_min(1e-12)).numpy()
    groups = merge_groups(model, image)
    painted = paint_merges(groups, picture)
    n = len(set(groups.flatten().tolist()) - {-1})
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    for ax, img, title in zip(axes, (picture, painted), ("input", f"{n} tokens")):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return painted
