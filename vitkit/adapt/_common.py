"""Helpers shared by adaptation methods: which parameters train."""
from __future__ import annotations

import torch.nn as nn


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier head of a timm ViT (`head`, plus `head_dist` on distilled DeiT)."""
    return [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(m, nn.Module)]


def head_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for attr in ("head", "head_dist"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            names |= {f"{attr}.{n}" for n, _ in module.named_parameters()}
    return names


def freeze(model: nn.Module, train_head: bool = True) -> None:
    """Freeze every parameter, then unfreeze the head when `train_head`."""
    model.requires_grad_(False)
    if train_head:
        for module in head_modules(model):
            module.requires_grad_(True)
