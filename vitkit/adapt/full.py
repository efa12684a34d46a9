"""Full fine-tuning: every parameter trains (the upper baseline of every PEFT table).

Nothing is hand-written beyond setting `requires_grad`. Spec: ../shared/methods/adapt.md (linear/full).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from vitkit.registry import register


@dataclass(frozen=True)
class Config:
    freeze_patch_embed: bool = field(default=False, metadata={"help": "keep the patch embedding frozen"})


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    model.requires_grad_(True)
    if cfg.freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    return model


register("full", kind="adapt", config=Config, apply=apply, identity={})
