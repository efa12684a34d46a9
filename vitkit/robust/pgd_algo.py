"""FGSM and PGD in plain torch: images in pixel space [0, 1], a loss closure, no model and no timm.

Notation: `x` (B, C, H, W) clean images in [0, 1]; `loss(x, y) -> scalar` the summed cross-entropy of the
model under attack (normalisation inside); `eps` the radius of the L∞ or L2 ball around `x`, in pixel units.
`Π(x') = clip_[0,1](x + proj_eps(x' − x))`: for L∞ the exact projection onto the ball ∩ [0, 1] (a box ∩ a
box); for L2 the projection onto the ball followed by the clip, which only shrinks every coordinate of the
perturbation, so the result stays in the ball (the common practice, as in torchattacks' PGDL2).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TINY = 1e-12  # keeps the L2 normalisations finite for a zero gradient or a zero perturbation


def _l2(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of (B, ...) as (B, 1, 1, 1)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step of the norm: sign(g) for L∞, g / ‖g‖₂ per sample for L2."""
    return grad.sign() if norm == "linf" else grad / (_l2(grad) + _TINY)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """`delta` projected onto the eps-ball: clamp for L∞, rescaled to norm ≤ eps for L2."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / (_l2(delta) + _TINY)).clamp(max=1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A random point of the eps-ball around `x` (clipped to [0, 1]): U(−eps, eps) per pixel for L∞; for L2 a
    uniform direction times a radius U(0, eps) (drawn on the CPU generator, so seeds agree across devices)."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * (2 * eps) - eps
    else:
        d = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=x.dtype)
        noise = d / (_l2(d) + _TINY) * r * eps
    return (x + noise.to(x.device)).clamp(0, 1)


def input_grad(loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ loss(x, y) / ∂x, without touching any `.grad` (torch.autograd.grad, not backward)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x, y), x)
    return grad


def fgsm(loss: Loss, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
         targeted: bool = False) -> torch.Tensor:
    """One step of size eps along the loss gradient's steepest direction, clipped to [0, 1]:
    `clip(x + eps·sign(∇ₓ loss))` (L∞), `clip(x + eps·∇/‖∇‖₂)` (L2); targeted runs descend `loss(x, t)`."""
    step = eps * direction(input_grad(loss, x, y), norm)
    return (x - step if targeted else x + step).clamp(0, 1).detach()


def pgd(loss: Loss, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        norm: str = "linf", targeted: bool = False, start: bool = True,
        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Projected gradient ascent (descent when `targeted`): from `x` (+ a random start when `start`),
    `steps` times `x' ← Π(x' ± alpha·direction(∇ₓ' loss))`."""
    x = x.detach()
    adv = random_start(x, eps, norm, generator) if start else x.clone()
    for _ in range(steps):
        step = alpha * direction(input_grad(loss, adv, y), norm)
        adv = adv - step if targeted else adv + step
        adv = (x + project(adv - x, eps, norm)).clamp(0, 1)
    return adv.detach()
