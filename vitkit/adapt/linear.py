"""Linear probe: train the classification head only, every other weight frozen.

The standard baseline of every PEFT table (VTAB-1k, FGVC) and the `linear` protocol of Battle of the Backbones.
Nothing is hand-written beyond setting `requires_grad`. Applied after another adaptation method (`vpt`, then
`linear`), it keeps what that method trains: it freezes the backbone, not the earlier adapters.
Spec: ../shared/methods/adapt.md (linear/full).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from vitkit.registry import register

from ._common import earlier_trainable, freeze_except


@dataclass(frozen=True)
class Config:
    """Linear probing has nothing to configure."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    freeze_except(model, earlier_trainable(model), train_head=True)
    return model


register("linear", kind="adapt", config=Config, apply=apply, identity={})
