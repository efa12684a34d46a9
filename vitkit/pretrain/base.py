"""What every objective shares: the base `Config` (learning rates), the base `Objective` module, EMA teachers.

Hand-written (no library has it): the split of parameters into the pretrained backbone (trained at
`backbone_lr`) and the objective's new parts (trained at `lr`), the model checks, and the default transform.
The momentum (EMA) teachers of `dino`, `sit` and `mmc-lite` are lightly's `update_momentum` on a frozen copy, with
lightly's `cosine_schedule` for the momentum.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    """Learning rates shared by every objective (each objective's `Config` inherits and may re-default them)."""

    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the objective's new parts "
                                              "(decoder, projection head); warm-up then cosine"})
    backbone_lr: float = field(default=1e-4, metadata={"help": "peak learning rate of the pretrained ViT; keep it "
                                                       "low: continued pre-training at full lr erases the "
                                                       "pretrained features"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay of matrices (not of biases, "
                                                        "norms, tokens or position embeddings)"})

    def __post_init__(self) -> None:
        for name in ("lr", "backbone_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pretrain: `{name}` must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"pretrain: `weight_decay` must be >= 0, got {self.weight_decay!r}")


class Views:
    """Several augmented views of one image, stacked `(V, C, H, W)` (DINO's global and local crops)."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([t(image) for t in self.transforms])

    def __repr__(self) -> str:
        return f"Views({len(self.transforms)})"


def teacher_copy(module: nn.Module, make: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """A momentum teacher for `module`: the same weights, no gradient. `make()` builds a fresh module to load them
    into where a deep copy fails (lightly's weight-normalised DINO head)."""
    if make is None:
        teacher = copy.deepcopy(module)
    else:
        teacher = make()
        teacher.load_state_dict(module.state_dict())
    return teacher.requires_grad_(False)


def ema_momentum(start: float, step: int, total_steps: int) -> float:
    """The teacher's EMA momentum after optimizer step `step` (1-based) of `total_steps`: cosine from `start` to 1
    (lightly's `cosine_schedule`; DINO's per-iteration schedule)."""
    from lightly.utils.scheduler import cosine_schedule

    return cosine_schedule(step - 1, total_steps, start, 1.0)


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """θ_t <- m·θ_t + (1-m)·θ_s for every (student, teacher) pair (lightly's `update_momentum`)."""
    from lightly.models.utils import update_momentum

    for student, teacher in pairs:
        update_momentum(student, teacher, momentum)


def check_vit(model: nn.Module, objective: str) -> None:
    """Refuse what is not a timm `VisionTransformer`-like model (patch embedding, blocks, prefix-token count)."""
    missing = [a for a in ("patch_embed", "blocks", "num_prefix_tokens", "forward_features", "forward_head")
               if not hasattr(model, a)]
    if missing:
        raise NotImplementedError(f"{objective}: needs a timm VisionTransformer (patch_embed, blocks, "
                                  f"num_prefix_tokens); {type(model).__name__} lacks {', '.join(missing)}")


class Objective(nn.Module):
    """Base of every objective: holds the timm ViT (`self.model`) and the config; see the package contract."""

    name = "objective"

    def __init__(self, model: nn.Module, cfg: Config, *, hold_model: bool = True):
        """Check `model` and keep it as `self.model` (`hold_model=False`: the subclass holds it in a wrapper and
        overrides `backbone`, so that its state is stored once)."""
        super().__init__()
        self.check(model)
        self.cfg = cfg
        if hold_model:
            self.model = model

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise `NotImplementedError` naming the reason when this objective cannot train `model`."""
        check_vit(model, cls.name)

    @property
    def backbone(self) -> nn.Module:
        """The pretrained ViT being trained (subclasses that store it elsewhere override this)."""
        return self.model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def transform(self) -> Callable:
        """The training transform of one image (default: the model's own training augmentation)."""
        from vitkit.data import transform

        return transform(self.backbone, train=True)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called by `fit` after each optimizer step (`step` counts the steps done so far)."""

    def distribute(self, world: int, device: torch.device) -> None:
        """Called by `fit` once its processes are up, before Accelerate wraps this module: with several processes
        each sees only its share of the batch, so batch norm in the objective's parts (DINO's heads, student and
        teacher) becomes `SyncBatchNorm`, as the DINO code does, and normalises over the global batch. The
        parameters stay the same tensors. torch syncs batch norm on GPUs only: on the CPU (gloo) it stays per
        process, with a warning."""
        norms = [n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and not isinstance(m, nn.SyncBatchNorm)]
        if world < 2 or not norms:
            return
        if device.type == "cpu":
            _log.warning("%s: batch norm (%s) normalises over each process's 1/%d of the batch: torch's "
                         "SyncBatchNorm needs GPUs", self.name, ", ".join(norms), world)
            return
        nn.SyncBatchNorm.convert_sync_batchnorm(self)  # replaces the children in place; the root is no norm

    def diagnose(self, metrics: dict) -> str | None:
        """A warning about the last epoch's `metrics` (e.g. a collapse), or None when nothing looks wrong."""
        return None

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter `name`: `backbone_lr / lr` for the ViT's, 1 for the new parts."""
        if not hasattr(self, "_backbone_names"):
            ids = {id(p) for p in self.backbone.parameters()}
            self._backbone_names = {n for n, p in self.named_parameters() if id(p) in ids}
        return self.cfg.backbone_lr / self.cfg.lr if name in self._backbone_names else 1.0

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters trained without weight decay (the ViT's tokens and position embedding)."""
        skip = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        prefix = next(n for n, m in self.named_modules() if m is self.backbone)
        return {f"{prefix}.{n}" for n in skip}

    def describe(self) -> list:
        """[name, config] as JSON values: what a resumed run must share with its checkpoint."""
        from vitkit.registry import config_dict

        return [self.name, config_dict(self.cfg)]
