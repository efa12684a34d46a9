"""Helpers shared by adaptation methods: which parameters train; new modules follow the model."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
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


def like(module: nn.Module, ref: torch.Tensor) -> nn.Module:
    """`module` moved to the device and (floating) dtype of `ref`, the tensor of the layer it extends: an
    adapter on a bf16 or fp16 model is bf16 or fp16 too."""
    return module.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)


def first_weight(module: nn.Module) -> torch.Tensor:
    """The first floating-point parameter of `module` (the reference for `like`)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take a device and dtype from")


@contextlib.contextmanager
def new_modules_follow_mode(model: nn.Module) -> Iterator[None]:
    """Inside the block a method adds modules; on exit each module that was not in `model` before takes the
    model's current train/eval mode (`nn.Module` starts in train mode, so an adapter added to a model in eval
    would otherwise run its dropout). Only the flag of new modules is set: wrapped layers keep theirs."""
    before = list(model.modules())  # held, so that no id below is reused by a new module
    seen = {id(m) for m in before}
    yield
    for module in model.modules():
        if id(module) not in seen:
            module.training = model.training
