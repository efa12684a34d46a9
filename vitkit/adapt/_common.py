"""Helpers shared by adaptation methods: which parameters train."""
from __future__ import annotations

import torch.nn as nn

from vitkit.io import base_key as base_name  # a parameter's name in the base model (PEFT's `base_layer`)


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


def earlier_trainable(model: nn.Module) -> set[str]:
    """Parameters made trainable by adaptation methods applied before this one (names without `.base_layer.`).

    The first adaptation method freezes the backbone; a later one (e.g. `lora` after `vpt`) must keep what the
    earlier ones train, so it freezes the backbone again but re-enables these. Empty when no `adapt` method was
    applied yet (then the freshly loaded model's all-trainable state means nothing).
    """
    from vitkit.registry import applied, get

    if not any(get(a.name).kind == "adapt" for a in applied(model)):
        return set()
    return {base_name(n) for n, p in model.named_parameters() if p.requires_grad}


def freeze_except(model: nn.Module, keep: set[str], train_head: bool = True) -> None:
    """Freeze every parameter but those named in `keep` (base names) and, when `train_head`, the head."""
    freeze(model, train_head=train_head)
    for name, p in model.named_parameters():
        if base_name(name) in keep:
            p.requires_grad_(True)


def forget(model: nn.Module, name: str) -> None:
    """Drop method `name` from the model's applied list (after merging it away, nothing of it remains)."""
    from vitkit.registry import applied

    applied(model)[:] = [a for a in applied(model) if a.name != name]
