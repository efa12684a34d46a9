"""Continued self-supervised pre-training of a pretrained timm ViT: `vk.pretrain(model, data, objective=...)`.

    model = vk.load("vitkit/vit-tiny-cifar")
    vk.pretrain(model, vk.data.digits(), objective="mae", epochs=5)   # the same timm model, trained in place
    vk.adapt(model, "linear")                                         # then adapt / fit / bench it as usual

An objective (`mae`, `dino`, ...) wraps the model with what it needs only while training (a decoder, a
projection head, an EMA teacher) and trains through `vk.fit`'s loop (`fit(..., objective=...)`: resume, Accelerate
multi-process, checkpoints, metrics); afterwards the extra parts are dropped and the model is the same timm
`VisionTransformer`, its state-dict keys unchanged, so it saves/loads as a plain timm model and as a bench backbone.

**The objective contract** (a new objective is one module `vitkit/pretrain/<name>.py`, `-` -> `_`):

1. A docstring: paper, claim, what comes from lightly (`lightly.loss`, `lightly.models.modules`,
   `lightly.models.utils` only: they import without Lightning) and what is hand-written and why.
2. `@dataclass(frozen=True) class Config(base.Config)`: inherits `lr` (heads), `backbone_lr` (the pretrained
   ViT: low by default, see the pitfall below) and `weight_decay`; adds the objective's own fields, each with
   `metadata={"help": ...}`, checks in `__post_init__` (call `super().__post_init__()`).
3. `class Objective(base.Objective)`: an `nn.Module` built as `Objective(model, cfg)`. `base.Objective.__init__`
   checks the model (`check`) and stores `self.model` (the timm ViT, trained in place; never re-initialised) and
   `self.cfg` (`hold_model=False` when a wrapper holds the ViT instead: then override `backbone`). It provides:
     - `forward(images) -> (loss, stats)`: one batch to a scalar loss; `stats` a dict of floats logged per epoch
       (e.g. DINO's collapse monitor). `images` is what `transform()` makes of one image, batched:
       `(B, C, H, W)`, or `(B, V, C, H, W)` for several views;
     - `transform() -> Callable[[PIL.Image], Tensor]`: the training transform (default: `vk.data.transform(
       model, train=True)`; multi-view objectives stack views into `(V, C, H, W)`);
     - `after_step(step, total_steps)`: called after each optimizer step (EMA teachers; default: nothing);
       state that must survive a resume (teacher, centre, step counters) lives in parameters or buffers;
     - `distribute(world, device)`: provided by the base, called by `fit` before Accelerate wraps the objective:
       with several GPU processes its batch norms become `SyncBatchNorm` (per process on the CPU, with a warning);
     - `diagnose(metrics) -> str | None`: a warning about the last epoch (DINO: collapse), default None;
     - `lr_scale(name)` / `no_weight_decay()`: provided by the base (backbone parameters train at
       `backbone_lr / lr`; position embeddings and tokens without decay);
     - `check(model)` (classmethod): raise `NotImplementedError("<name>: ...")` for a model it cannot train.
   Parameters of `self.model` keep their names under `model.` (or `encoder.vit.` for lightly's masked wrapper,
   see `base.Objective.backbone`); everything else is dropped after training.
4. Last line: `register_objective("name", config=Config, objective=Objective)`.

`vk.pretrain` freezes the classifier head (self-supervision never reaches it) and trains the whole backbone, unless
an adaptation method is applied (LoRA, ExPLoRA-style partial unfreezing): then what that method left trainable
trains. Objectives in this package: `mae`, `dino` (and, from the augmentation work, `sit`, `mmc-lite`).

**Pitfall** (spec E): continued pre-training at full learning rate erases the pretrained features; every objective
defaults to a backbone lr well below its heads' (`backbone_lr`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vitkit.registry import Entry, Registry

OBJECTIVES = Registry("objective", ("vitkit.pretrain",), skip=("base", "commands", "run"), context="pretrain: ")


@dataclass(frozen=True)
class ObjectiveEntry(Entry):
    """A registered objective: its name, `Config` dataclass, `Objective` module class and one-line doc."""

    name: str
    config: type
    objective: Callable
    doc: str = ""


def register_objective(name: str, *, config: type, objective: Callable) -> None:
    """Register an objective. Called once, at the foot of the objective's module."""
    OBJECTIVES.add(ObjectiveEntry(name, config, objective), owner=objective)


def objectives() -> list[ObjectiveEntry]:
    """Every registered objective, sorted by name (modules of this package are imported on first use)."""
    return OBJECTIVES.all()


def get_objective(name: str) -> ObjectiveEntry:
    """The objective called `name`; an unknown name raises a `ValueError` listing the registered ones."""
    return OBJECTIVES.get(name)


from .run import pretrain  # noqa: E402  (the verb, after the registry it reads)

__all__ = ["pretrain", "objectives", "get_objective", "register_objective", "ObjectiveEntry"]
