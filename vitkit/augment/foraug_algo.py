"""ForAug's recombination of one foreground with one background, in plain torch.

Images are (C, H, W) tensors (any normalisation: every step is affine per pixel or a linear resampling, so it
commutes with per-channel normalisation); masks and alphas (H, W) in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fill_background(images: torch.Tensor, masks: torch.Tensor, iters: int | None = None) -> torch.Tensor:
    """(B, C, H, W) images with their foreground in-painted by diffusion (a crude stand-in for LaMa).

    The region `masks > 0.05`, dilated by one pixel (so soft edges leave no trace), starts at the mean colour of
    the image's other pixels; then, `iters` times (default max(H, W) // 2), each of its pixels becomes the mean of
    its 3x3 neighbourhood (neighbours inside the image). Pixels outside the region are kept.
    """
    region = F.max_pool2d((masks > 0.05).float()[:, None], 3, stride=1, padding=1)  # (B, 1, H, W)
    keep = 1.0 - region
    weight = keep.sum((2, 3), keepdim=True)
    mean = torch.where(weight > 0, (images * keep).sum((2, 3), keepdim=True) / weight.clamp_min(1),
                       images.mean((2, 3), keepdim=True))
    x = images * keep + mean * region
    for _ in range(max(images.shape[-2:]) // 2 if iters is None else iters):
        smooth = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = images * keep + smooth * region
    return x


def target_ratio(r_fg: float, r_bg: float, jitter: float, u: float) -> float:
    """Pasted foreground area / image area: `u` ∈ [0, 1] across [min(r)(1-j), max(r)(1+j)]."""
    lo, hi = min(r_fg, r_bg) * (1 - jitter), max(r_fg, r_bg) * (1 + jitter)
    return lo + u * (hi - lo)


def bates(n: int, generator: torch.Generator | None = None) -> float:
    """A draw from Bates(n) on [0, 1] (mean of n uniforms); n = 0: the centre, 0.5."""
    return 0.5 if n == 0 else torch.rand(n, generator=generator).mean().item()


def place(fg: torch.Tensor, alpha: torch.Tensor, ratio: float, u: float, v: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the foreground to its alpha's bounding box, resize it (aspect kept) so that its alpha covers `ratio`
    of the image, centre-crop it if larger than the image, and put its top-left corner at `u`, `v` of the free
    range per axis (no jut-out). Returns the (C, H, W) placed foreground (zeros elsewhere) and (H, W) alpha."""
    C, H, W = fg.shape
    rows, cols = torch.nonzero(alpha > 0, as_tuple=True)
    y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    crop, a = fg[:, y0:y1, x0:x1], alpha[y0:y1, x0:x1]
    bh, bw = y1 - y0, x1 - x0
    fill = a.sum().item() / (bh * bw)  # the ratio refers to the object's pixels, not its bounding box
    s = math.sqrt(ratio * H * W / fill / (bh * bw))
    h, w = max(1, round(bh * s)), max(1, round(bw * s))
    if (h, w) != (bh, bw):
        both = F.interpolate(torch.cat([crop, a[None]])[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        crop, a = both[:C], both[C].clamp(0, 1)
    if h > H or w > W:  # too large: keep the centre
        t, l = max(0, (h - H) // 2), max(0, (w - W) // 2)
        crop, a = crop[:, t:t + H, l:l + W], a[t:t + H, l:l + W]
        h, w = a.shape
    top, left = round(u * (H - h)), round(v * (W - w))
    out, out_a = fg.new_zeros(C, H, W), alpha.new_zeros(H, W)
    out[:, top:top + h, left:left + w] = crop
    out_a[top:top + h, left:left + w] = a
    return out, out_a


def blur_alpha(alpha: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-blurred alpha (soft edge); `sigma` <= 0 keeps it."""
    if sigma <= 0:
        return alpha
    from torchvision.transforms.v2.functional import gaussian_blur

    k = min(2 * math.ceil(3 * sigma) + 1, 2 * min(alpha.shape) - 1)  # reflect padding needs k//2 < size
    return gaussian_blur(alpha[None, None], [k, k], [sigma, sigma])[0, 0]


def composite(fg: torch.Tensor, alpha: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """`alpha·fg + (1 - alpha)·bg`."""
    return alpha * fg + (1 - alpha) * bg
