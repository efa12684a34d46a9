"""Prompt-patch zero-shot segmentation and intra/inter-object similarity overlap (MMC evaluation protocol).

Paper: *Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding* (Wu et al., 2023),
arXiv:2308.11448. Only the protocol is implemented (MMC's pretraining is not): final-norm patch tokens are
L2-normalised, the patch under a clicked pixel is the prompt, every patch's cosine similarity to it forms a map
that is bilinearly upsampled to the input and thresholded. `similarity_overlap` measures how well patch cosines
separate pairs inside one object from pairs across objects (AUROC, and the overlap Σ_b min(h_intra, h_inter) of
the two histograms on fixed bins over [-1, 1]).

*Plugs in at.* Read-only: `model.forward_intermediates(norm=True)` (the block runner's version strips prompts and
unmerges merged tokens) for `feature="x"`; the attention's q/k/v taps (`attention.capture(tokens=True)`: q, k after
q/k-norm, V from `attn.qkv`, heads concatenated) for `feature="q"|"k"|"v"`. Any `features(x) -> (B, C, gh, gw)`
callable can replace them.
*Hand-written here, and why:* the protocol has no released code; it is a few tensor operations.

Spec: ../shared/methods/explain.md (E5). Docs: docs/explain.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from vitkit.models.layout import token_layout

from .image import ImageLike, load_image, mask_overlay, model_transform, prepare, save_pair, upsample

Features = Callable[[torch.Tensor], torch.Tensor]
FEATURES = ("x", "q", "k", "v")


def _block_index(model: nn.Module, layer: int) -> int:
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"segment: `layer` {layer} out of range for a model with {depth} blocks")
    return layer % depth


def patch_features(model: nn.Module, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """(B, C, gh, gw) patch tokens of block `layer` after the final norm (prefix and prompts dropped)."""
    with torch.no_grad():
        return model.forward_intermediates(x, indices=[_block_index(model, layer)], norm=True, output_fmt="NCHW",
                                           intermediates_only=True)[0]


def check_feature(feature: str) -> None:
    if feature not in FEATURES:
        raise ValueError(f"segment: `feature` must be one of {', '.join(FEATURES)} (block output tokens, queries, "
                         f"keys, values), got {feature!r}")


def token_features(model: nn.Module, x: torch.Tensor, layer: int = -1, feature: str = "x") -> torch.Tensor:
    """(B, C, gh, gw) patch features of block `layer`: its output tokens after the final norm (`feature="x"`), or
    the attention's queries / keys (after q/k-norm, what SDPA sees) / values, heads concatenated (C = h·d)."""
    check_feature(feature)
    if feature == "x":
        return patch_features(model, x, layer)
    from .attention import capture

    i = _block_index(model, layer)
    with torch.no_grad(), capture(model, [i], tokens=True, softmax=False) as maps:
        model.forward_features(x)
    return maps[i].patch_tokens(feature)


def similarity(feats: torch.Tensor, patch: Union[int, torch.Tensor]) -> torch.Tensor:
    """(B, gh, gw) cosine similarity of every patch to the prompt patch `patch` (flat index, per sample)."""
    B, C, gh, gw = feats.shape
    f = F.normalize(feats.flatten(2), dim=1)  # (B, C, G)
    idx = torch.as_tensor(patch, device=f.device).reshape(-1).expand(B)
    prompt = f.gather(2, idx.view(B, 1, 1).expand(B, C, 1))  # (B, C, 1)
    return (f * prompt).sum(1).reshape(B, gh, gw)


def click_to_patch(point: tuple[float, float], image_size: tuple[int, int], input_size: tuple[int, int],
                   patch_size: tuple[int, int]) -> tuple[int, int]:
    """Pixel (x, y) of the original image (W, H = `image_size`) -> (row, col) of the patch it falls in after the
    resize to `input_size` (H, W)."""
    x, y = point
    w0, h0 = image_size
    H, W = input_size
    if not (0 <= x < w0 and 0 <= y < h0):
        raise ValueError(f"segment: `point` {point} lies outside the {w0}x{h0} image")
    u, v = x * W / w0, y * H / h0
    return int(v // patch_size[0]), int(u // patch_size[1])


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold (scikit-image) of a similarity map."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


@dataclass
class Segmentation:
    """What `vk.segment` returns.

    Attributes:
        mask: (H, W) bool at input resolution.
        similarity: (H, W) upsampled cosine similarity to the prompt patch.
        patch_similarity: (gh, gw) cosine similarity on the patch grid.
        threshold: τ used (Otsu's when none was given).
        patch: (row, col) of the prompt patch.
        point: the prompt in input pixels (x, y).
        image: the resized RGB image (None for tensor input).
    """

    mask: np.ndarray
    similarity: np.ndarray
    patch_similarity: np.ndarray
    threshold: float
    patch: tuple[int, int]
    point: tuple[float, float]
    image: Optional[Image.Image] = None

    def overlay(self, size: Optional[tuple[int, int]] = None) -> Image.Image:
        """The mask tinted over the image with the prompt marked, at `size` (H, W; default the input's)."""
        mask, point = self.mask, self.point
        if size is not None and tuple(size) != mask.shape:
            sim = upsample(torch.from_numpy(self.patch_similarity)[None], tuple(size))[0].numpy()
            mask = sim >= self.threshold
            point = (point[0] * size[1] / self.mask.shape[1], point[1] * size[0] / self.mask.shape[0])
        base = self.image if self.image is not None else Image.new("RGB", mask.shape[::-1], (128, 128, 128))
        if base.size != mask.shape[::-1]:
            base = base.resize(mask.shape[::-1], Image.BICUBIC)
        return mask_overlay(base, mask, point)

    def save(self, path: Union[str, Path], size: Optional[tuple[int, int]] = None) -> tuple[Path, Path]:
        """Overlay PNG at `path` (at `size`, see `overlay`) and the similarity map (H, W) as `.npy` next to it."""
        return save_pair(self.overlay(size), self.similarity, path)


def segment(model: nn.Module, image: Union[ImageLike, torch.Tensor], point: tuple[float, float], layer: int = -1,
            threshold: Optional[float] = None, *, feature: str = "x", size=None, mean=None, std=None,
            features: Optional[Features] = None) -> Segmentation:
    """Zero-shot mask of the object under `point` from patch-token similarity (MMC protocol).

    Args:
        model: a timm VisionTransformer.
        image: path, PIL image or array (through `vk.data.transform(model)`: the training resize and centre
            crop at `size`, default the model's input size, normalised with `mean` / `std`, default the model's
            data config), or a normalised tensor (C, H, W) / (1, C, H, W).
        point: (x, y) in pixels of the image as given (mapped through the resize and crop to a patch; a point
            the crop cuts away raises `ValueError`).
        layer: block whose patch features are compared.
        threshold: mask = similarity >= threshold; Otsu's threshold of the map when None.
        feature: which tokens of block `layer`: 'x' (its output tokens after the final norm), 'q', 'k' or 'v'
            (the attention's queries and keys after q/k-norm, or values; heads concatenated).
        features: optional `x -> (B, C, gh, gw)` replacing the model's patch tokens (then `feature` stays 'x').
    """
    if features is not None and feature != "x":
        raise ValueError(f"segment: pass either `features` (your own extractor) or `feature`={feature!r}, not both")
    check_feature(feature)
    if threshold is not None and not -1 <= float(threshold) <= 1:  # also NaN: every comparison with it is False
        raise ValueError(f"segment: `threshold` is a cosine similarity, so it must be in [-1, 1], got {threshold}; "
                         "leave it unset for Otsu's threshold of the map")
    if isinstance(image, torch.Tensor):
        x, pil = prepare(model, image)
        orig = (x.shape[-1], x.shape[-2])
        point_in = (float(point[0]), float(point[1]))
    else:
        raw = load_image(image)
        tf = model_transform(model, size, mean, std)
        x, pil = prepare(model, raw, size=size, mean=mean, std=std)
        orig = raw.size
        from vitkit.data.transforms import map_point

        point_in = map_point(tf, point, orig)
    if x.shape[0] != 1:
        raise ValueError(f"segment: one image at a time, got a batch of {x.shape[0]}")
    H, W = x.shape[-2:]
    if not (0 <= point[0] < orig[0] and 0 <= point[1] < orig[1]):
        raise ValueError(f"segment: `point` {tuple(point)} lies outside the {orig[0]}x{orig[1]} image")
    if not (0 <= point_in[0] < W and 0 <= point_in[1] < H):
        raise ValueError(f"segment: `point` {tuple(point)} lies in the part of the {orig[0]}x{orig[1]} image that "
                         f"the model's transform crops away (it resizes the short side and keeps the centre "
                         f"{W}x{H}, as in training); click inside the centre, or pass a tensor / a cropped image")
    ph, pw = token_layout(model).patch_size
    r, c = int(point_in[1] // ph), int(point_in[0] // pw)
    feats = features(x) if features is not None else token_features(model, x, layer, feature)
    gh, gw = feats.shape[-2:]
    sim = similarity(feats, r * gw + c)
    full = upsample(sim, (H, W))[0].cpu().numpy()
    tau = otsu(full) if threshold is None else float(threshold)
    return Segmentation(full >= tau, full, sim[0].cpu().numpy(), tau, (r, c), point_in, pil)


# --------------------------------------------------------------------------------------------------- evaluation
def patch_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, gh, gw) majority label per patch (ties: lowest label)."""
    B, H, W = masks.shape
    gh, gw = grid
    ph, pw = H // gh, W // gw
    blocks = masks.reshape(B, gh, ph, gw, pw).permute(0, 1, 3, 2, 4).reshape(B, gh, gw, ph * pw)
    return blocks.mode(-1).values


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


@dataclass
class SegmentationScores:
    """mIoU of prompt-point segmentation over a set of images, per threshold."""

    thresholds: np.ndarray
    miou: np.ndarray  # per threshold
    best_threshold: float = 0.0
    best_miou: float = 0.0
    area: float = 0.0  # mean IoU(τ) over τ in [0, 1] (trapezoid), the threshold-free summary

    def at(self, tau: float) -> float:
        return float(self.miou[int(np.argmin(np.abs(self.thresholds - tau)))])


def evaluate_segmentation(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, points: Sequence[tuple[int, int]],
                          layer: int = -1, thresholds: Optional[np.ndarray] = None,
                          features: Optional[Features] = None, feature: str = "x") -> SegmentationScores:
    """mIoU of `segment`'s protocol on normalised images `x` (B, C, H, W) with boolean object `masks` (B, H, W)
    and one prompt pixel (x, y) per image, for every threshold in `thresholds` (default 0, 0.05, ..., 1);
    `feature` as in `segment`."""
    thresholds = np.round(np.linspace(0, 1, 21), 4) if thresholds is None else np.asarray(thresholds)
    H, W = x.shape[-2:]
    ph, pw = token_layout(model).patch_size
    feats = features(x) if features is not None else token_features(model, x, layer, feature)
    gw = feats.shape[-1]
    idx = torch.tensor([int(py // ph) * gw + int(px // pw) for px, py in points])
    sims = upsample(similarity(feats, idx), (H, W)).cpu().numpy()
    truth = masks.cpu().numpy().astype(bool)
    ious = np.array([[iou(s >= t, m) for t in thresholds] for s, m in zip(sims, truth)])  # (B, T)
    miou = ious.mean(0)
    best = int(np.argmax(miou))
    area = float(np.trapezoid(miou, thresholds) / (thresholds[-1] - thresholds[0])) if len(thresholds) > 1 else 0.0
    return SegmentationScores(thresholds, miou, float(thresholds[best]), float(miou[best]), area)


@dataclass
class Overlap:
    """Intra- vs inter-object patch similarity (`similarity_overlap`)."""

    auroc: float
    overlap: float
    intra: np.ndarray = field(repr=False)
    inter: np.ndarray = field(repr=False)
    bins: np.ndarray = field(repr=False)

    def plot(self, path: Union[str, Path], title: str = "") -> Path:
        """Histogram plot of both distributions, saved as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(self.intra, bins=self.bins, density=True, alpha=0.6, label="same object")
        ax.hist(self.inter, bins=self.bins, density=True, alpha=0.6, label="different objects")
        ax.set_xlabel("patch cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(title or f"AUROC {self.auroc:.3f}, overlap {self.overlap:.3f}")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def overlap_scores(intra: np.ndarray, inter: np.ndarray, bins: int = 50) -> Overlap:
    """AUROC of separating intra from inter cosines, and Σ_b min(h_intra, h_inter) on `bins` over [-1, 1]."""
    from sklearn.metrics import roc_auc_score

    if len(intra) == 0 or len(inter) == 0:
        raise ValueError("similarity_overlap: need patch pairs both within and across objects; every mask has "
                         "a single label")
    edges = np.linspace(-1, 1, bins + 1)
    hi = np.histogram(np.clip(intra, -1, 1), edges)[0] / len(intra)
    he = np.histogram(np.clip(inter, -1, 1), edges)[0] / len(inter)
    y = np.r_[np.ones(len(intra)), np.zeros(len(inter))]
    auroc = float(roc_auc_score(y, np.r_[intra, inter]))
    return Overlap(auroc, float(np.minimum(hi, he).sum()), intra, inter, edges)


def similarity_overlap(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, layer: int = -1,
                       bins: int = 50, plot: Union[None, str, Path] = None, ignore_index: int = -1,
                       features: Optional[Features] = None, feature: str = "x") -> Overlap:
    """Intra- vs inter-object cosine similarity of patch tokens over a set of images.

    Args:
        images: (B, C, H, W) normalised images.
        masks: (B, H, W) integer object labels (each patch takes its majority label; `ignore_index` skipped).
            Pairs are formed within each image.
        plot: write the histogram plot there (PNG).
        feature: the block's tokens compared, as in `segment` ('x', 'q', 'k', 'v').
    """
    feats = features(images) if features is not None else token_features(model, images, layer, feature)
    labels = patch_labels(masks.long(), tuple(feats.shape[-2:])).flatten(1)
    f = F.normalize(feats.flatten(2), dim=1)
    intra, inter = [], []
    for b in range(f.shape[0]):
        keep = labels[b] != ignore_index
        fb, lb = f[b][:, keep], labels[b][keep]
        cos = (fb.T @ fb).cpu().numpy()
        same = (lb[:, None] == lb[None, :]).cpu().numpy()
        iu = np.triu_indices(len(lb), k=1)
        intra.append(cos[iu][same[iu]])
        inter.append(cos[iu][~same[iu]])
    result = overlap_scores(np.concatenate(intra), np.concatenate(inter), bins=bins)
    if plot is not None:
        result.plot(plot)
    return result
