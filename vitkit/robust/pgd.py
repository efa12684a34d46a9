"""PGD, projected gradient descent: the white-box L∞ / L2 attack of iterated gradient steps inside the ε ball.

Paper: *Towards Deep Learning Models Resistant to Adversarial Attacks*, Madry et al., ICLR 2018,
arXiv:1706.06083.

Claim implemented: the multi-step first-order attack — a random start in the ε ball, then `steps` times
`x ← Π(x + α·sign(∇ₓ CE(f(x), y)))` (L2: `α·∇/‖∇‖₂`; targeted: descend `CE(f(x), t)`) — with the ε ball in
pixel space [0, 1] whatever the model's normalisation. Defaults are torchattacks' (ε = 8/255, α = 2/255,
10 steps, random start).

Plugs in at: the input only (`vk.attack`); the model is never changed (eval mode, frozen, restored). Fused
attention is kept.

Hand-written here, and why: torchattacks (the maintained library) has PGD, but it draws its random start
from the global RNG, averages the loss over the batch and runs outside vitkit's frozen/restore contract;
the algorithm is ~20 lines (`pgd_algo.py`). `backend="torchattacks"` runs torchattacks' own `PGD` / `PGDL2`
for cross-checks. Spec: ../shared/methods/robust.md R1. Docs: docs/robust.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import pgd_algo as algo
from .api import register_attack, torchattacks_setup


def check_common(name: str, eps: float, norm: str) -> None:
    """The checks every gradient attack's config shares (ε >= 0, a known norm)."""
    if eps < 0:
        raise ValueError(f"{name}: `eps` must be >= 0, got {eps} (ε is in pixel units of [0, 1] images, e.g. "
                         f"8/255 = {8 / 255:.5f})")
    if norm not in ("linf", "l2"):
        raise ValueError(f"{name}: `norm` must be 'linf' or 'l2', got {norm!r}")


@dataclass(frozen=True)
class Config:
    eps: float = field(default=8 / 255, metadata={
        "help": "radius of the ε ball in pixel units of [0, 1] images (L∞: per pixel, e.g. 8/255; L2: of the "
                "whole perturbation, e.g. 0.5)"})
    alpha: float = field(default=2 / 255, metadata={"help": "step size α in pixel units (L∞ per pixel, L2 norm)"})
    steps: int = field(default=10, metadata={"help": "gradient steps T"})
    random_start: bool = field(default=True, metadata={"help": "start from a uniform random point of the ε ball"})
    norm: Literal["linf", "l2"] = field(default="linf", metadata={"help": "the threat model's norm: linf or l2"})

    def __post_init__(self):
        check_common("pgd", self.eps, self.norm)
        if self.alpha < 0:
            raise ValueError(f"pgd: `alpha` must be >= 0, got {self.alpha}")
        if self.steps < 1:
            raise ValueError(f"pgd: `steps` must be >= 1, got {self.steps}")


def run(ctx, x, y, cfg: Config):
    """PGD on one batch of pixel images (see `vitkit.robust.api.Attack.run`)."""
    return algo.pgd(ctx.loss, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, norm=cfg.norm,
                    targeted=ctx.targeted, start=cfg.random_start, generator=ctx.generator)


def torchattacks_attack(ctx, cfg: Config):
    """torchattacks' `PGD` (L∞) or `PGDL2` with the model's normalisation inside."""
    import_name, kwargs = ("PGD", {}) if cfg.norm == "linf" else ("PGDL2", {"eps_for_division": algo._TINY})
    return torchattacks_setup(ctx, import_name, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                              random_start=cfg.random_start, **kwargs)


register_attack("pgd", config=Config, run=run, torchattacks=torchattacks_attack)
