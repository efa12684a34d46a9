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
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for full fine-tuning (AdamW, "
                "batch 64, 100 epochs; V-PETL Bench uses it too; shared/methods/bench.md §4)"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    model.requires_grad_(True)
    if cfg.freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    return model


register("full", kind="adapt", config=Config, apply=apply, identity={})
