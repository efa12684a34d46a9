"""DTA's algorithm on plain tensors: the feature-cosine loss, the tanh-parameterised crafting loop, the layer rule.

*Downstream Transfer Attack: Adversarial Attacks on Downstream Models with Pre-trained Vision Transformers*
(Zheng, Ma et al., 2024). Knows nothing about timm: a feature extractor is any callable `images -> (B, ...)`
tensor. Written from the spec (../shared/methods/robust.md, R2), not from any reference code.

Shapes: `B` batch, images `(B, C, H, W)` in pixel space [0, 1]; features `(B, N, D)` (any trailing shape: they
are flattened per sample).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Features = Callable[[torch.Tensor], torch.Tensor]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of the flattened features `a`, `b` (B, ...) -> (B,)."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-12)


def perturb(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """`clip_[0,1](x + eps·tanh(w))`: inside the L∞ ball of radius `eps` by construction."""
    return (x + eps * torch.tanh(w)).clamp(0.0, 1.0)


def craft(features: Features, x: torch.Tensor, w: torch.Tensor, *, eps: float, steps: int,
          lr: float) -> tuple[torch.Tensor, list[float]]:
    """Minimise `L(δ) = mean_b cos(vec g(x_b + δ_b), vec g(x_b))` over `δ = eps·tanh(w)` with Adam on `w`.

    Args:
        features: `g`, the layer tap of the source model (gradients flow to the input only).
        x: (B, C, H, W) clean images in [0, 1].
        w: (B, C, H, W) the starting parameters (the spec draws them from U(-1, 1)); not modified.
        eps, steps, lr: L∞ radius in pixel units, Adam steps, Adam learning rate.

    Returns:
        The adversarial images (detached) and the loss before every step and after the last one (steps + 1
        values: `losses[0]` is the loss at the random start, `losses[-1]` that of the returned images).
    """
    with torch.no_grad():
        clean = features(x).detach()
    w = w.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    losses = []
    for _ in range(steps):
        loss = cosine(features(perturb(x, w, eps)), clean).mean()
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad(loss, [w])  # the input only: never a parameter of the source model
        w.grad = grad
        optimizer.step()
    with torch.no_grad():
        x_adv = perturb(x, w, eps)
        losses.append(cosine(features(x_adv), clean).mean().item())
    return x_adv, losses


def choose_layer(layers: Sequence[Features], final: Features, x: torch.Tensor, w: torch.Tensor, *, eps: float,
                 steps: int, lr: float) -> tuple[int, list[float]]:
    """vitkit's reconstruction of DTA's automatic layer choice (the paper's rule is not released).

    Attack each candidate layer on the probe images `x` and keep the one whose adversarial examples most reduce
    the cosine similarity of the *final* features (`final`: what a downstream head reads), i.e. the argmin of
    `mean_b cos(final(x_adv_l), final(x))`; ties go to the earliest layer.

    Returns:
        The chosen index into `layers` and the final-feature cosine for every candidate (the per-layer curve).
    """
    with torch.no_grad():
        clean = final(x)
    curve = []
    for g in layers:
        x_adv, _ = craft(g, x, w, eps=eps, steps=steps, lr=lr)
        with torch.no_grad():
            curve.append(cosine(final(x_adv), clean).mean().item())
    return min(range(len(curve)), key=curve.__getitem__), curve


def sign_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random baseline of equal budget: `clip_[0,1](x + eps·s)`, `s` uniform in {-1, +1} per pixel."""
    s = torch.randint(0, 2, x.shape, generator=generator, device="cpu").to(x.device, x.dtype) * 2 - 1
    return (x + eps * s).clamp(0.0, 1.0)
