"""DINO: self-distillation from an EMA teacher across views, with centring and sharpening.

Paper: *Emerging Properties in Self-Supervised Vision Transformers* (Caron et al., ICCV 2021, arXiv 2104.14294).
Claim: a student matching the centred, sharpened output of its own momentum (EMA) teacher across crops learns
features with strong k-NN and linear-probe accuracy (ViT-B 80.1% IN-1k linear); here used to *continue*
pre-training a pretrained ViT on a new domain.

Plugs in at: the ViT's own `forward_features` -> `forward_head(pre_logits=True)` (pooled features, whatever the
pooling: class token, average, registers), followed by lightly's `DINOProjectionHead`; the teacher is a deep copy
of both (no gradient) updated by lightly's `update_momentum` with lightly's `cosine_schedule` (momentum 0.996 -> 1);
lightly's `DINOLoss` does the cross-entropy over view pairs (the same view excluded), the teacher centring and the
centre's EMA. Both networks start from the pretrained weights; the heads are random.
Hand-written here, and why: the teacher-temperature warm-up per optimizer step (lightly's schedule is per epoch),
freezing the head's last layer at the start (lightly's `cancel_last_layer_gradients` needs the epoch, which the
objective does not see: a gradient hook over the first `freeze_last_layer` of the steps), the views (timm's
training transform, several crops of each image, see `transform`) and the collapse monitor (lightly has none): the
teacher's centred, sharpened distribution has its per-image entropy and the entropy of its batch mean logged each
epoch, both over log K: per-image -> 1 is uniform collapse, batch -> 0 is one-output collapse.
Continued pre-training needs batch norm in the head (lightly's `batch_norm`, the paper code's `use_bn_in_head`,
off there): a pretrained ViT's features of a new domain are nearly parallel (mean cosine 0.96 for the embedded
CIFAR model on digits), so without it the head gives every image nearly the same output, the centre removes it and
the sharpened rest is uniform from the first step (0.99 of log K: no signal; `tests/pretrain/test_dino.py`).
With several GPU processes `vk.fit` turns these batch norms into `SyncBatchNorm` (`base.Objective.distribute`).
Differs from the reference: local crops are drawn at the model's input size (a timm ViT without
`dynamic_img_size` takes one size), so they cost as much as global ones and there are 2 by default (paper 8 at
96 px); the head is small (output 256, paper 65,536) and has batch norm; the teacher temperature stays at 0.04
(the paper's code default; its text warms it up to 0.07).
Docs: docs/pretrain.md.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.pretrain import register_objective

from . import base


@dataclass(frozen=True)
class Config(base.Config):
    """DINO settings (paper values in the help; head sized for small ViTs and CPU batches)."""

    lr: float = field(default=1e-3, metadata={"help": "peak lr of the projection head (paper: 5e-4·batch/256)"})
    weight_decay: float = field(default=0.04, metadata={"help": "AdamW weight decay (paper 0.04 -> 0.4)"})
    output_dim: int = field(default=256, metadata={"help": "head output K (paper 65,536; small batches and short "
                                                   "runs need a small K: 256 measured on benchmarks/pretrain.py)"})
    hidden_dim: int = field(default=512, metadata={"help": "head MLP width (paper 2048)"})
    bottleneck_dim: int = field(default=128, metadata={"help": "head bottleneck before the weight-normalised last "
                                                       "layer (paper 256)"})
    head_batch_norm: bool = field(default=True, metadata={"help": "batch norm in the head's MLP (the paper's code "
                                                          "option use_bn_in_head, off there): a pretrained ViT's "
                                                          "features of a new domain are nearly parallel, and without "
                                                          "it the centred teacher output is uniform from the start"})
    global_views: int = field(default=2, metadata={"help": "global crops per image, seen by teacher and student "
                                                   "(paper 2)"})
    local_views: int = field(default=2, metadata={"help": "local crops per image, student only (paper 8, at 96 px; "
                                                  "here at the model's input size)"})
    global_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "area range of global crops "
                                                                             "(paper 0.4-1)"})
    local_scale: tuple[float, float] = field(default=(0.05, 0.4), metadata={"help": "area range of local crops "
                                                                            "(paper 0.05-0.4)"})
    student_temp: float = field(default=0.1, metadata={"help": "student softmax temperature (paper 0.1)"})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature at the start (paper "
                                                               "0.04)"})
    teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature after the warm-up (paper "
                                                        "0.04-0.07; its code's default 0.04)"})
    teacher_temp_warmup: float = field(default=0.3, metadata={"help": "fraction of the optimizer steps over which "
                                                              "the teacher temperature rises linearly (paper 30 of "
                                                              "100 epochs)"})
    center_momentum: float = field(default=0.9, metadata={"help": "EMA momentum of the teacher centre (paper 0.9)"})
    momentum: float = field(default=0.996, metadata={"help": "teacher EMA momentum at the start, cosine to 1 at the "
                                                     "end (paper 0.996)"})
    freeze_last_layer: float = field(default=0.1, metadata={"help": "fraction of the optimizer steps at the start "
                                                            "during which the head's last layer does not train "
                                                            "(paper: the first epoch; 0.1 = the first epoch of 10)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("output_dim", "hidden_dim", "bottleneck_dim", "global_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"dino: `{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.local_views < 0 or self.global_views + self.local_views < 2:
            raise ValueError(f"dino: needs at least 2 views (global_views + local_views), got "
                             f"{self.global_views} + {self.local_views}")
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"dino: `{name}` must be > 0, got {getattr(self, name)!r}")
        for name in ("center_momentum", "momentum", "teacher_temp_warmup", "freeze_last_layer"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"dino: `{name}` must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"dino: `{name}` must be (low, high) with 0 < low <= high <= 1, got "
                                 f"{getattr(self, name)!r}")


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ViT's pooled pre-logits `(B, D)` (what `vk.evaluate`'s probes read)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


class Objective(base.Objective):
    """Student (the ViT + a DINO head) and its EMA teacher; `forward(views) -> (loss, collapse monitor)`."""

    name = "dino"

    def __init__(self, model: nn.Module, cfg: Config):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        super().__init__(model, cfg)
        dim = model.forward_head(model.forward_features(self._probe(model)), pre_logits=True).shape[-1]
        def make_head() -> nn.Module:
            with warnings.catch_warnings():  # lightly's head uses torch's older weight_norm (still supported)
                warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
                return DINOProjectionHead(input_dim=dim, hidden_dim=cfg.hidden_dim,
                                          bottleneck_dim=cfg.bottleneck_dim, output_dim=cfg.output_dim,
                                          batch_norm=cfg.head_batch_norm)

        self.head = make_head()
        self.teacher = base.teacher_copy(self.model)
        self.teacher_head = base.teacher_copy(self.head, make_head)  # weight-normalised layers cannot be deep-copied
        for p in self.head.last_layer.parameters():  # weight_v (the row norms weight_g are fixed at 1 by lightly)
            if p.requires_grad:
                p.register_hook(self._freeze_last_layer)
        self.criterion = DINOLoss(output_dim=cfg.output_dim, teacher_temp=cfg.teacher_temp,
                                  student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps done (resumed with it)
        self.register_buffer("total_steps", torch.ones((), dtype=torch.long))

    @staticmethod
    def _probe(model: nn.Module) -> torch.Tensor:
        """A zero image (1, C, H, W) at the model's input size, to read the feature width."""
        size = tuple(model.patch_embed.img_size)
        return torch.zeros(1, model.patch_embed.proj.in_channels, *size, device=next(model.parameters()).device)

    def teacher_temperature(self) -> float:
        """Linear from `warmup_teacher_temp` to `teacher_temp` over the first `teacher_temp_warmup` of the steps."""
        warm = self.cfg.teacher_temp_warmup * int(self.total_steps)
        t = min(1.0, int(self.step) / warm) if warm > 0 else 1.0
        return self.cfg.warmup_teacher_temp + t * (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp)

    def last_layer_frozen(self) -> bool:
        """Whether the head's last layer is frozen now: during the first `freeze_last_layer` of the steps."""
        return int(self.step) < self.cfg.freeze_last_layer * int(self.total_steps)

    def _freeze_last_layer(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient hook of the last layer's direction `weight_v`: zero while frozen. The paper drops the gradient;
        a zero gradient does the same here (and keeps DDP's buckets full): AdamW's moments stay zero, so the update
        is zero, and weight decay only rescales `weight_v`, which the fixed-norm weight normalisation ignores."""
        return torch.zeros_like(grad) if self.last_layer_frozen() else grad

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if views.ndim != 5:
            raise ValueError(f"dino: expects views (B, V, C, H, W) from its transform, got shape {tuple(views.shape)}")
        b, v = views.shape[:2]
        g = self.cfg.global_views
        if self.cfg.head_batch_norm and self.training and b * g < 2:
            raise ValueError(f"dino: the head's batch norm needs at least 2 teacher inputs per batch, got {b} image(s) "
                             f"x {g} global view(s); use a larger batch or head_batch_norm=False")
        student = self.head(features(self.model, views.flatten(0, 1)))  # (B·V, K)
        student = student.unflatten(0, (b, v)).transpose(0, 1)  # (V, B, K)
        with torch.no_grad():
            teacher = self.teacher_head(features(self.teacher, views[:, :g].flatten(0, 1)))
            teacher = teacher.unflatten(0, (b, g)).transpose(0, 1)  # (G, B, K)
            stats = self.collapse_monitor(teacher)
        loss = self.criterion(list(teacher), list(student), teacher_temp=self.teacher_temperature())
        return loss, stats

    @torch.no_grad()
    def collapse_monitor(self, teacher: torch.Tensor) -> dict[str, float]:
        """Entropies (over log K) of the teacher's centred, sharpened softmax: per image, and of the batch mean."""
        p = torch.softmax((teacher.float() - self.criterion.center) / self.teacher_temperature(), dim=-1)
        p = p.flatten(0, 1)  # (G·B, K)
        log_k = math.log(p.shape[-1])
        per_image = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        mean = p.mean(0)
        batch = -(mean * mean.clamp_min(1e-12).log()).sum()
        return {"teacher_entropy": float(per_image) / log_k, "teacher_batch_entropy": float(batch) / log_k}

    def diagnose(self, metrics: dict) -> str | None:
        """Collapse, read from the monitor: the teacher's per-image entropy near log K (uniform output) or the
        entropy of its batch mean near 0 (one output for every image)."""
        uniform, batch = metrics.get("teacher_entropy"), metrics.get("teacher_batch_entropy")
        if uniform is not None and uniform > 0.95:
            return (f"dino: the teacher's output is nearly uniform (entropy {uniform:.3f} of log K): collapse; keep "
                    "head_batch_norm on, try a lower teacher_temp, a smaller output_dim or more steps")
        if batch is not None and batch < 0.05:
            return (f"dino: the teacher gives nearly every image the same output (batch entropy {batch:.3f} of log "
                    "K): collapse; try a higher teacher_temp or center_momentum")
        return None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the teacher (ViT and head), m cosine from `momentum` to 1 at the step just done."""
        self.total_steps.fill_(total_steps)
        base.ema_update([(self.model, self.teacher), (self.head, self.teacher_head)],
                        base.ema_momentum(self.cfg.momentum, step, total_steps))
        self.step.fill_(step)

    def transform(self):
        """`global_views` crops of area `global_scale`, then `local_views` of `local_scale`, flip + colour jitter."""
        from vitkit.data import transform

        return base.Views([transform(self.model, train=True, scale=self.cfg.global_scale)] * self.cfg.global_views
                          + [transform(self.model, train=True, scale=self.cfg.local_scale)] * self.cfg.local_views)


register_objective("dino", config=Config, objective=Objective)
