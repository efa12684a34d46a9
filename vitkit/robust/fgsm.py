"""FGSM, the fast gradient sign method: one step of size ε along the sign of the input gradient.

Paper: *Explaining and Harnessing Adversarial Examples*, Goodfellow, Shlens, Szegedy, ICLR 2015,
arXiv:1412.6572.

Claim implemented: `x' = clip_[0,1](x + ε·sign(∇ₓ CE(f(x), y)))` (L2: `ε·∇/‖∇‖₂`, the fast gradient method;
targeted: descend `CE(f(x), t)`), ε in pixel space [0, 1] whatever the model's normalisation. Equals PGD with
one step of size ε and no random start.

Plugs in at: the input only (`vk.attack`); the model is never changed.

Hand-written here, and why: one line of torch (`pgd_algo.fgsm`), kept inside vitkit's frozen/restore contract;
`backend="torchattacks"` runs torchattacks' `FGSM` (L∞) or its `PGDL2` with one step of size ε and no random
start (L2; torchattacks has no L2 FGSM). Spec: ../shared/methods/robust.md R1. Docs: docs/robust.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import pgd_algo as algo
from .api import register_attack, torchattacks_setup
from .pgd import check_common


@dataclass(frozen=True)
class Config:
    eps: float = field(default=8 / 255, metadata={
        "help": "radius of the ε ball (FGSM: also the step) in pixel units of [0, 1] images (L∞: per pixel, "
                "e.g. 8/255; L2: of the whole perturbation, e.g. 0.5)"})
    norm: Literal["linf", "l2"] = field(default="linf", metadata={"help": "the threat model's norm: linf or l2"})

    def __post_init__(self):
        check_common("fgsm", self.eps, self.norm)


def run(ctx, x, y, cfg: Config):
    """FGSM on one batch of pixel images (see `vitkit.robust.api.Attack.run`)."""
    return algo.fgsm(ctx.loss, x, y, eps=cfg.eps, norm=cfg.norm, targeted=ctx.targeted)


def torchattacks_attack(ctx, cfg: Config):
    if cfg.norm == "linf":
        return torchattacks_setup(ctx, "FGSM", eps=cfg.eps)
    return torchattacks_setup(ctx, "PGDL2", eps=cfg.eps, alpha=cfg.eps, steps=1, random_start=False,
                              eps_for_division=algo._TINY)


register_attack("fgsm", config=Config, run=run, torchattacks=torchattacks_attack)
