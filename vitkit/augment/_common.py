"""The protocol between training-time augmentations and `vk.fit`.

An augmentation's `apply(model, cfg)` attaches a callable `fn(model, mix, extras) -> Mix` to the model (`attach`).
For each training batch `vk.fit` calls `mix_batch`, which runs the attached callables in the order they were
applied, then runs the forward inside `mix.forward()` (where an augmentation may read the model, as TransMix
reads the last block's attention) and takes the loss against `mix.target(num_classes)`: the labels, or soft
targets (B, K) when an augmentation mixed labels. Randomness comes from torch's and numpy's global generators,
which `vk.fit` seeds and checkpoints, so a resumed run draws the same augmentations.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

_KEY = "_vitkit_augment"


@dataclass
class Mix:
    """One training batch as the augmentations leave it.

    Attributes:
        images: (B, C, H, W) the images the model is trained on.
        labels: (B,) the original integer labels.
        target_fn: `num_classes -> (B, K)` soft targets, computed after the forward; None: the labels.
        contexts: context-manager factories active during the forward (read-only hooks).
    """

    images: torch.Tensor
    labels: torch.Tensor
    target_fn: Optional[Callable[[int], torch.Tensor]] = None
    contexts: list = field(default_factory=list)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Run the model's forward inside this (every augmentation's hooks are on, then removed)."""
        with ExitStack() as stack:
            for factory in self.contexts:
                stack.enter_context(factory())
            yield

    def target(self, num_classes: int) -> torch.Tensor:
        """What the loss compares the logits with: labels (B,) or soft targets (B, num_classes)."""
        return self.labels if self.target_fn is None else self.target_fn(num_classes)


def attach(model: nn.Module, name: str, fn: Callable[[nn.Module, Mix, Sequence[torch.Tensor]], Mix]) -> None:
    """Attach augmentation `name` (applying it again replaces its settings, keeping its place in the order)."""
    model.__dict__.setdefault(_KEY, {})[name] = fn


def attached(model: nn.Module) -> dict:
    """`{name: fn}` of the augmentations attached to `model`, in the order they were applied."""
    return model.__dict__.get(_KEY, {})


def refuse_attached(model: nn.Module, who: str, why: str) -> None:
    """A ValueError when augmentations are attached to `model` but the loss `who` trains with never sees them
    (`why`): a training loop that would otherwise run without them, silently."""
    names = list(attached(model))
    if names:
        raise ValueError(f"{who}: augmentation(s) {', '.join(names)} are attached to the model, but {why}, so they "
                         "would be silently ignored; train a model without vk.augment (the classification loss of "
                         "vk.fit is the one that uses them)")


def mix_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              extras: Sequence[torch.Tensor] = ()) -> Mix:
    """Run every augmentation attached to `model` on one batch; `extras`: further batch items (e.g. masks)."""
    mix = Mix(images, labels)
    for fn in attached(model).values():
        mix = fn(model, mix, extras)
    return mix
