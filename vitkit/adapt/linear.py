"""Linear probe: train the classification head only, every other weight frozen.

The standard baseline of every PEFT table (VTAB-1k, FGVC) and the `linear` protocol of Battle of the Backbones.
Nothing is hand-written beyond setting `requires_grad`. Applied after another adaptation method (`vpt`, then
`linear`), it keeps what that method trains: it freezes the backbone, not the earlier adapters.
Spec: ../shared/methods/adapt.md (linear/full).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from vitkit.registry import register

from ._common import earlier_trainable, freeze_except


@dataclass(frozen=True)
class Config:
    """Linear probing configures only its training defaults."""

    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for the linear probe (AdamW, "
                "batch 64, 100 epochs; V-PETL Bench uses it too; shared/methods/bench.md §4)"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    freeze_except(model, earlier_trainable(model), train_head=True)
    return model


register("linear", kind="adapt", config=Config, apply=apply, identity={})
