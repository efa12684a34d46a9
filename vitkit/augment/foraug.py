"""ForAug: paste each image's foreground onto another image's background at a random size and position.

Paper: *ForAug: Recombining Foregrounds and Backgrounds to Improve Vision Transformer Training with Bias
Mitigation* (Nauen et al., 2025), arXiv:2503.09399. *Claim.* Recombined training images break background,
centre and size shortcuts (up to +4.5 points ImageNet for ViTs trained on ForNet). Implemented per sample
(with probability `prob`; otherwise the original): foreground of image i (its mask as alpha) onto a background
chosen by `background` (`orig` its own, `same` one of the same class in the batch, `all` any in the batch),
whose own foreground is in-painted by diffusion (`foraug_algo.fill_background`); pasted area / image area from
U[min(r_fg, r_bg)(1-j), max(r_fg, r_bg)(1+j)] (r: mask fill fractions, j = `size_jitter`), relative to the
object's pixels (its fill fraction), not its box; aspect kept, centre-cropped if too large; position per axis
Bates(`position_n`) over the free range (no jut-out); alpha edge blurred with σ ~ U(0.1, 1)·`edge_sigma`
(at 224 px, scaled to the image). The label stays the foreground's. Samples with no foreground, or whose
background is mostly foreground (fill ≥ `max_bg_fill`), are left as they are.

*Plugs in at.* `vk.fit` (vitkit.augment's batch protocol): a pure image transform on the training batch. Masks
come from the batch (`masks="given"`: the training dataset yields `(image, label, mask)`, mask (H, W) or (1, H, W)
in [0, 1] aligned with the transformed image), or from vitkit's zero-shot segmentation (`masks="segment"`:
`vk.segment`'s protocol on the model being trained, prompt patch at `segment_point`, Otsu threshold; an extra
no-grad forward per batch).

*Hand-written here, and why.* No library recombines foregrounds and backgrounds; the reference is a dataset
over precomputed assets. *Differs from the reference.* Its offline stage (Grounded SAM prompted with the class
name, LaMa/SDXL in-painting, version filtering) needs hub weights and a GPU and is not shipped; here the
backgrounds are the other images of the batch with their foreground in-painted by diffusion from the
surrounding pixels (a crude in-paint: a flat mean colour left the partner's silhouette, a shape cue of another
class), and the alpha is blurred but not sharpened afterwards.

Spec: ../shared/methods/augment-pretrain.md (D2). Docs: docs/pretrain.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from vitkit.augment._common import Mix, attach
from vitkit.registry import register

from . import foraug_algo as algo


@dataclass(frozen=True)
class Config:
    prob: float = field(default=1.0, metadata={
        "help": "chance that a sample is recombined (the paper's 1 - orig_img_prob)"})
    masks: Literal["given", "segment"] = field(default="given", metadata={
        "help": "mask source: given (the dataset yields (image, label, mask)) or segment (vk.segment on the model)"})
    background: Literal["orig", "same", "all"] = field(default="all", metadata={
        "help": "background from: orig (own image), same (same class in the batch), all (any image in the batch)"})
    size_jitter: float = field(default=0.3, metadata={
        "help": "j: pasted area ratio between min·(1-j) and max·(1+j) of the two images' mask fill fractions"})
    position_n: int = field(default=1, metadata={
        "help": "Bates n of the position per axis: 1 uniform, larger more central, 0 always centred"})
    edge_sigma: float = field(default=4.0, metadata={
        "help": "alpha edge blur σ ~ U(0.1, 1)·edge_sigma at 224 px (scaled to the image); 0: hard edge"})
    max_bg_fill: float = field(default=0.8, metadata={
        "help": "backgrounds whose foreground fills this share or more are not used"})
    segment_point: tuple[float, float] = field(default=(0.5, 0.5), metadata={
        "help": "masks=segment: prompt point (x, y) as a fraction of the image size"})

    def __post_init__(self):
        for name in ("prob", "max_bg_fill", "size_jitter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"foraug: `{name}` must be in [0, 1], got {getattr(self, name)}")
        if self.position_n < 0 or self.edge_sigma < 0:
            raise ValueError(f"foraug: `position_n` and `edge_sigma` must be >= 0, got {self.position_n}, "
                             f"{self.edge_sigma}")
        if len(self.segment_point) != 2 or not all(0 <= p < 1 for p in self.segment_point):
            raise ValueError(f"foraug: `segment_point` must be (x, y) fractions in [0, 1), got {self.segment_point}")


def segment_masks(model: nn.Module, images: torch.Tensor, point: tuple[float, float]) -> torch.Tensor:
    """(B, H, W) zero-shot masks (vk.segment's protocol): cosine similarity of final-normed patch tokens to the
    patch under `point` (fractions of W, H), upsampled, thresholded at each map's Otsu threshold."""
    from vitkit.explain.image import upsample
    from vitkit.explain.segment import otsu, patch_features, similarity

    was_training = model.training
    model.eval()
    try:
        feats = patch_features(model, images)  # (B, C, gh, gw), no grad
    finally:
        model.train(was_training)
    gh, gw = feats.shape[-2:]
    patch = int(point[1] * gh) * gw + int(point[0] * gw)
    sim = upsample(similarity(feats, patch), tuple(images.shape[-2:]))
    return torch.stack([(s >= otsu(s.cpu().numpy())).float() for s in sim])


class _ForAug:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def masks(self, model: nn.Module, mix: Mix, extras) -> torch.Tensor:
        x = mix.images
        if self.cfg.masks == "segment":
            return segment_masks(model, x, self.cfg.segment_point)
        if not extras:
            raise ValueError("foraug: masks='given' needs batches of (images, labels, masks): make the training "
                             "dataset yield (image, label, mask), or use masks='segment'")
        m = extras[0].to(x.device, torch.float32)
        m = m[:, 0] if m.ndim == 4 and m.shape[1] == 1 else m
        if m.shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(f"foraug: masks of shape {tuple(extras[0].shape)} do not match images "
                             f"{tuple(x.shape)}; expected (B, H, W) or (B, 1, H, W)")
        if m.min() < 0 or m.max() > 1:
            raise ValueError(f"foraug: mask values must lie in [0, 1], got [{m.min().item():g}, {m.max().item():g}]")
        return m

    def partner(self, i: int, labels: torch.Tensor) -> int:
        if self.cfg.background == "orig":
            return i
        pool = torch.nonzero(labels == labels[i]).flatten() if self.cfg.background == "same" else \
            torch.arange(len(labels))
        return int(pool[torch.randint(len(pool), ())])

    def __call__(self, model: nn.Module, mix: Mix, extras) -> Mix:
        cfg, x = self.cfg, mix.images
        chosen = torch.rand(x.shape[0]) < cfg.prob
        if not chosen.any():
            return mix
        masks = self.masks(model, mix, extras)
        fill = masks.flatten(1).mean(1).tolist()
        backgrounds = algo.fill_background(x, masks)
        out, labels = x.clone(), mix.labels.cpu()
        for i in torch.nonzero(chosen).flatten().tolist():
            j = self.partner(i, labels)
            if fill[i] == 0 or fill[j] >= cfg.max_bg_fill:
                continue
            ratio = algo.target_ratio(fill[i], fill[j], cfg.size_jitter, torch.rand(()).item())
            u, v = algo.bates(cfg.position_n), algo.bates(cfg.position_n)
            fg, alpha = algo.place(x[i], masks[i], ratio, u, v)
            sigma = (0.1 + 0.9 * torch.rand(()).item()) * cfg.edge_sigma * x.shape[-1] / 224
            out[i] = algo.composite(fg, algo.blur_alpha(alpha, sigma), backgrounds[j])
        return Mix(out, mix.labels, mix.target_fn, mix.contexts)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    """Attach ForAug to `model`'s training (`vk.fit`); the model's outputs are unchanged."""
    attach(model, "foraug", _ForAug(cfg))
    return model


register("foraug", kind="augment", config=Config, apply=apply, identity={"prob": 0.0})
