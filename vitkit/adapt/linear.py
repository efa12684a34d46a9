"""Linear probe: train the classification head only, every other weight frozen.

The standard baseline of every PEFT table (VTAB-1k, FGVC) and the `linear` protocol of Battle of the Backbones.
Nothing is hand-written beyond setting `requires_grad`. Spec: ../shared/methods/adapt.md (linear/full).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from vitkit.registry import register

from ._common import freeze


@dataclass(frozen=True)
class Config:
    """Linear probing has nothing to configure."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    freeze(model, train_head=True)
    return model


register("linear", kind="adapt", config=Config, apply=apply, identity={})
