"""The distillation registry, the frozen `Teacher`, feature taps, and `Distiller` (the module `vk.fit` trains).

See the package docstring (`vitkit/distill/__init__.py`) for the contract a method module follows.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.registry import Entry, Registry


# ----------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DistillMethod(Entry):
    """A registered distillation method: its `Config`, its `loss` module class and `vk.fit` defaults."""

    name: str
    config: type
    loss: type
    fit_defaults: dict = field(default_factory=dict)
    doc: str = ""


METHODS = Registry("distill method", ("vitkit.distill",), skip=("base", "run", "commands", "losses"))


def _fit_keys() -> set[str]:
    from vitkit.train.fit import fit

    return set(inspect.signature(fit).parameters) - {"model", "train", "val"}


def register(name: str, *, config: type, loss: type, fit_defaults: Optional[dict] = None) -> None:
    """Register a distillation method; called once, on the last line of the method's module."""
    if dataclasses.is_dataclass(config):
        clash = sorted({f.name for f in dataclasses.fields(config)} & _fit_keys())
        if clash:
            raise ValueError(f"distill method `{name}`: config fields {clash} are vk.fit settings; rename them, or "
                             "state training defaults with register(..., fit_defaults={...})")
    bad = sorted(set(fit_defaults or {}) - _fit_keys())
    if bad:
        raise ValueError(f"distill method `{name}`: fit_defaults {bad} are not vk.fit settings")
    if not (isinstance(loss, type) and issubclass(loss, DistillLoss)):
        raise TypeError(f"distill method `{name}`: loss must be a DistillLoss subclass, got {loss!r}")
    METHODS.add(DistillMethod(name, config, loss, dict(fit_defaults or {})), owner=loss)


def methods() -> list[DistillMethod]:
    """Every registered distillation method, sorted by name."""
    return METHODS.all()


def get(name: str) -> DistillMethod:
    """The distillation method `name`; an unknown name raises a `ValueError` listing the closest names."""
    return METHODS.get(name)


def require_plain_vit(model: nn.Module, method: str) -> None:
    """Refuse, naming `method`, a model that is not a timm `VisionTransformer` or that already has token-sequence
    methods (prompts, token reduction): the repair methods (`registers`, `denoise`, `locality-align`) change the
    tokens of every patch and the prefix, so they come first."""
    from timm.models.vision_transformer import VisionTransformer

    from vitkit.models.runner import get_runner, has_runner

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"{method}: needs a timm VisionTransformer, got {type(model).__name__}")
    if has_runner(model) and get_runner(model).owners():
        raise NotImplementedError(f"{method}: apply it before token reduction and prompts "
                                  f"(already applied: {', '.join(get_runner(model).owners())})")


# ------------------------------------------------------------------------------------------------- the teacher
def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a model expects (its timm data config)."""
    from vitkit.data import data_config

    cfg = data_config(model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def transform_stats(transform) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """(mean, std) of the last `Normalize` step of a (nested) torchvision transform, or None."""
    from torchvision import transforms as T

    from vitkit.data.transforms import _steps

    found = [s for s in _steps(transform) if isinstance(s, T.Normalize)] if transform is not None else []
    if not found:
        return None
    mean, std = found[-1].mean, found[-1].std
    return tuple(float(v) for v in torch.as_tensor(mean).flatten()), tuple(float(v) for v in
                                                                         torch.as_tensor(std).flatten())


def model_input_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The fixed input size of a ViT (`patch_embed.img_size`), or None (CNNs, `dynamic_img_size` ViTs)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_size",
                                                                                    False):
        return None
    size = getattr(patch_embed, "img_size", None)
    return tuple(size) if size is not None else None


class Teacher:
    """A frozen teacher: `eval()`, `requires_grad_(False)`, called under `no_grad`, and fed the student's view
    re-normalised to its own mean/std (and resized to its input size when that is fixed and differs).

    Not an `nn.Module` attribute of `Distiller` on purpose: its weights stay out of the optimizer, DDP,
    checkpoints and `model.train()`.

    Args:
        model: any timm model (ViT or CNN).
        data_stats: (mean, std) the training images are normalised with (the student's view).
    """

    def __init__(self, model: nn.Module, data_stats: tuple[Sequence[float], Sequence[float]]):
        self.model = model.eval().requires_grad_(False)
        own = input_stats(model)
        self.renorm = None
        if tuple(map(tuple, data_stats)) != own:
            d_mean, d_std = (torch.tensor(v).view(1, -1, 1, 1) for v in data_stats)
            t_mean, t_std = (torch.tensor(v).view(1, -1, 1, 1) for v in own)
            self.renorm = (d_std / t_std, (d_mean - t_mean) / t_std)  # x_t = x_d · a + b
        self.size = model_input_size(model)

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """The student's batch `(B, 3, H, W)` as the teacher expects it."""
        self.to(images.device)
        if self.renorm is not None:
            a, b = (v.to(images.device, images.dtype) for v in self.renorm)
            images = images * a + b
        if self.size is not None and tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return images

    def to(self, device: torch.device) -> "Teacher":
        param = next(self.model.parameters(), None)
        if param is not None and param.device != torch.device(device):
            self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits `(B, classes)` for the student's batch."""
        self.model.eval()
        return self.model(self.input(images))

    @torch.no_grad()
    def taps(self, images: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and `(B, C, H, W)` maps after the blocks/stages `indices` (see `taps`)."""
        self.model.eval()
        return taps(self.model, self.input(images), indices)


def taps(model: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward giving the logits and the `(B, C, H, W)` maps after blocks (ViT) or stages (CNN) `indices`.

    Uses timm's `forward_intermediates(output_fmt='NCHW')`: prefix tokens (class, registers) removed, patches on
    their grid; negative indices count from the end (`-1` = last block / stage, before the final norm).
    """
    if not hasattr(model, "forward_intermediates"):
        raise NotImplementedError(f"distill: {type(model).__name__} has no forward_intermediates; feature taps need "
                                  "a timm model (ViT, ResNet, ConvNeXt, ...)")
    depth = len(getattr(model, "blocks", None) or getattr(model, "stages", None) or getattr(model, "feature_info"))
    wanted = sorted({i % depth for i in indices})
    final, maps = model.forward_intermediates(images, indices=wanted, output_fmt="NCHW")
    by_index = dict(zip(wanted, maps))
    return model.forward_head(final), [by_index[i % depth] for i in indices]


# ---------------------------------------------------------------------------------------------- loss and wrapper
@dataclass
class Step:
    """What a `DistillLoss` returns for one batch: student `logits` (B, classes) or None, the scalar `loss`, and
    the class `labels` (B,) the training accuracy is counted against (None: not counted)."""

    logits: Optional[torch.Tensor]
    loss: torch.Tensor
    labels: Optional[torch.Tensor]


class DistillLoss(nn.Module):
    """Base class of a method's loss. Subclasses own their trainable parts (projectors) as sub-modules.

    Class attributes:
        needs_teacher: False when training runs without any teacher forward (the logit cache).
    """

    needs_teacher = True

    def __init__(self, cfg: Any, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        """Build trainable parts; `example` is a small batch of training images (to probe feature shapes)."""
        super().__init__()
        self.cfg = cfg

    def prepare_data(self, data, teacher: Optional[Teacher], *, epochs: int, seed: int, batch_size: int,
                     progress: bool = True):
        """The dataset `vk.fit` trains on (default: `data` unchanged). The logit cache writes and replays here."""
        return data

    def forward(self, student: nn.Module, teacher: Optional[Teacher], images: torch.Tensor,
                targets: torch.Tensor) -> Step:
        raise NotImplementedError


class Distiller(nn.Module):
    """`student` + the method's `loss` (with its trainable parts) as one module for `vk.fit`.

    `fit` sees `computes_loss = True` and calls `distiller(images, targets) -> (logits, loss, labels)`; without
    targets (validation, inference) it is the student. Checkpoints hold the student's and the loss's trained
    tensors; the teacher is outside the module tree (frozen, never saved, never in `train()` mode).
    """

    computes_loss = True

    def __init__(self, student: nn.Module, loss: DistillLoss, teacher: Optional[Teacher]):
        super().__init__()
        self.student = student
        self.loss = loss
        self.__dict__["teacher"] = teacher  # not a sub-module: see the class docstring

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if targets is None:
            return self.student(images)
        step = self.loss(self.student, self.teacher, images, targets)
        loss = step.loss
        for extra in self.student.__dict__.get("_vitkit_losses", []):  # terms the student's methods add (add_loss)
            loss = loss + extra(self.student, images, step.logits, step.labels)
        return step.logits, loss, step.labels

    def no_weight_decay(self) -> set[str]:
        """Full names of the tensors AdamW must not decay (the student's tokens and position embeddings)."""
        skip = set(getattr(self.student, "no_weight_decay", lambda: set())())
        return {f"student.{n}" for n, _ in self.student.named_parameters() if n.split(".")[0] in skip}
