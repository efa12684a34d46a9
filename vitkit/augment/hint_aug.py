"""Hint-Aug: few-shot augmentation from the frozen ViT (attentive over-fitting detector + confusion-based feature
infusion).

Paper: *Hint-Aug: Drawing Hints from Foundation Vision Transformers Towards Boosted Few-Shot Parameter-Efficient
Tuning* (Yu et al., CVPR 2023), arXiv:2304.14831.
*Claim.* 0.04%–32.91% higher accuracy than the state-of-the-art augmentation across low-shot settings (5 datasets,
3 PEFT methods); Pets +2.22% with 50% less data. Measured here (embedded ViT, digits, VPT-deep, 3 seeds,
benchmarks/RESULTS.md): ±0.2 points at 1 and 2 shots, +0.7 / +1.0 points at 4 shots: not shown at that scale.

Implemented, per training batch from epoch `start_epoch` on (the mechanism the paper describes):
1. AOD: the head-mean attention of block `layer` (default `round(L/3)`, the paper's 4 of 12) of the frozen
   teacher (a copy of the model taken when Hint-Aug is applied) and of the tuned student on the clean batch;
   each key column L2-normalised over the queries, averaged over the queries, prefix columns dropped (the
   student's prompt rows and columns are left out, so both compare the same tokens); `Δ = teacher − student`.
   A sample with `max|Δ| > threshold` takes its `num_patch` patches of largest Δ, else the `num_patch` patches its
   own attention scores highest (the rate of the first branch is logged per epoch).
2. CFI: target `y_att = softmax(acc[y] / temperature)`, `acc[c]` = Σ (logits − min logits) over the class-c
   training samples of the previous epoch (uniform before any epoch was seen). δ on the chosen patches only,
   `δ ~ U(±ε/σ)`, one Adam step (lr `step_lr`) that **increases** `CE(f(x + δ ⊙ M), y_att)`, projected onto the
   ε-ball (ε in pixel units, σ the model's normalisation std) and the pixel range. The gradient step is applied
   in both AOD branches (the reference's `patch_fool_fixed` never assigns it, so that branch adds random noise).
3. The model trains on the clean batch and the perturbed batch together: `[x; x']` with targets `[y; smoothed
   one-hot(y)]` (`smoothing` spread over the other classes). The paper takes two optimizer steps (clean, then
   perturbed); `vk.fit` takes one step per batch, so here both halves share one step (the mean of the two
   losses).
`epsilon = 0` is the identity of the augmentation (the perturbed half equals the clean batch, through the same
path). The model's outputs are never changed: Hint-Aug only feeds training.

*Plugs in at.* `vk.fit` (vitkit.augment's batch protocol; `set_epoch` is called before each epoch). Attention is
read through `vitkit.explain.attention` (q/k taps, fused SDPA kept); the training forward is hooked to record
its logits for `acc`. Apply it right after loading, before the PEFT method: the teacher is the model as it is
when Hint-Aug is applied (a second copy of it is held in memory). Refused: token reduction during training (the
AOD layer must see every patch), models whose attention vitkit cannot read.

*Hand-written here, and why.* No library implements Hint-Aug; torchattacks' attacks perturb whole images
against labels, not chosen patches against confusion targets. The tensor pieces are in `hint_aug_algo.py`.
*Differs from the reference.* No NOAH supernet, no `.cuda()`; additive δ on the patches (`x + δ ⊙ M`);
one optimizer step for both halves (above). Spec: ../shared/methods/adapt.md P14, augment-pretrain.md D3.
Docs: docs/adapt.md.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.augment._common import Mix, attach
from vitkit.explain.attention import _check_attention, attention
from vitkit.models.layout import token_layout
from vitkit.registry import register

from . import hint_aug_algo as algo

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    start_epoch: int = field(default=20, metadata={"help": "first epoch (0-based) that augments (the paper's "
                                                           "start_adv = 20 of 100); earlier epochs only record acc"})
    layer: Optional[int] = field(default=None, metadata={
        "help": "block whose attention the AOD compares (None: round(depth/3), the paper's 4 of 12)"})
    num_patch: int = field(default=2, metadata={"help": "patches perturbed per image"})
    threshold: float = field(default=0.7, metadata={
        "help": "max|Δ| above which the teacher-student drift chooses the patches (else the student's attention)"})
    epsilon: float = field(default=0.001, metadata={
        "help": "L∞ radius of δ in pixel units ([0, 1] images); 0: the perturbed half equals the clean batch"})
    step_lr: float = field(default=0.1, metadata={"help": "lr of the one Adam step on δ"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature on acc[c] (1 reproduces the code; larger: softer confusion targets)"})
    smoothing: float = field(default=0.1, metadata={"help": "label mass spread over the other classes for the "
                                                            "perturbed half"})

    def __post_init__(self):
        if self.start_epoch < 0 or self.num_patch < 1:
            raise ValueError(f"hint-aug: `start_epoch` must be >= 0 and `num_patch` >= 1, got {self.start_epoch}, "
                             f"{self.num_patch}")
        for name in ("epsilon", "step_lr", "threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"hint-aug: `{name}` must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or not 0 <= self.smoothing < 1:
            raise ValueError(f"hint-aug: `temperature` must be > 0 and `smoothing` in [0, 1), got "
                             f"{self.temperature}, {self.smoothing}")


def _scores(maps, layer: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, G) AOD patch scores of one captured layer, prompts left out."""
    a = maps[layer]
    p, n, G = a.layout.num_prefix_tokens, a.num_prompts, grid[0] * grid[1]
    if a.source is not None or a.attn.shape[-1] != p + n + G:
        raise NotImplementedError(f"hint-aug: block {layer} sees {a.attn.shape[-1]} tokens, not the {p} prefix + "
                                  f"{n} prompts + {G} patches: token reduction or patch dropout is active in "
                                  "training; apply token reduction after training")
    keep = torch.cat([torch.arange(p), torch.arange(p + n, p + n + G)]).to(a.attn.device)
    heads = a.heads("mean")[:, keep][:, :, keep]
    return algo.patch_scores(heads, p)


class _HintAug:
    def __init__(self, cfg: Config, teacher: nn.Module, layer: int, data_config: dict):
        self.cfg, self.teacher, self.layer, self.data_config = cfg, teacher, layer, data_config
        self.epoch, self.acc, self.acc_previous = 0, None, None
        self.samples = self.teacher_branch = 0
        self.drift_rates: list[tuple[int, float]] = []  # (epoch, share of samples whose patches the drift chose)

    def set_epoch(self, epoch: int) -> None:
        """Called by `vk.fit` before each epoch: the confusion of the finished epoch becomes the CFI's."""
        if epoch == self.epoch:
            return
        if self.samples:
            self.drift_rates.append((self.epoch, self.teacher_branch / self.samples))
            _log.info("hint-aug: epoch %d: the teacher-student drift chose the patches of %.1f%% of %d samples",
                      self.epoch + 1, 100 * self.teacher_branch / self.samples, self.samples)
        self.epoch, self.acc_previous, self.acc = epoch, self.acc, None
        self.samples = self.teacher_branch = 0

    def _recorder(self, model: nn.Module, labels: torch.Tensor):
        """Context factory: the training forward's logits of the clean samples are summed into `acc`."""
        @contextmanager
        def record():
            def hook(module, args, out):
                logits = out[:len(labels)].detach().float()
                if self.acc is None:
                    self.acc = logits.new_zeros(logits.shape[1], logits.shape[1])
                self.acc.index_add_(0, labels, logits - logits.amin(1, keepdim=True))
            handle = model.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()
        return record

    def __call__(self, model: nn.Module, mix: Mix, extras) -> Mix:
        cfg, x, y = self.cfg, mix.images, mix.labels
        record = self._recorder(model, y)
        if self.epoch < cfg.start_epoch:
            return Mix(x, y, mix.target_fn, mix.contexts + [record])
        layout = token_layout(model)
        grid = layout.grid(tuple(x.shape[-2:]))
        with torch.no_grad():
            teacher = _scores(attention(self.teacher, x, layers=[self.layer]), self.layer, grid)
            student = _scores(attention(model, x, layers=[self.layer]), self.layer, grid)
            num_classes = model(x[:1]).shape[-1] if self.acc_previous is None else self.acc_previous.shape[0]
        index, drifted = algo.choose_patches(teacher, student, min(cfg.num_patch, grid[0] * grid[1]), cfg.threshold)
        self.samples, self.teacher_branch = self.samples + len(y), self.teacher_branch + int(drifted.sum())
        mask = algo.patch_mask(index, grid, tuple(model.patch_embed.patch_size)).to(x.dtype)
        acc = self.acc_previous if self.acc_previous is not None else x.new_zeros(num_classes, num_classes)
        y_att = algo.confusion_targets(acc.to(x.device), y, cfg.temperature)
        mean, std = (torch.tensor(self.data_config[k], dtype=x.dtype, device=x.device) for k in ("mean", "std"))
        x_aug = algo.cfi_step(lambda z: F.cross_entropy(model(z), y_att), x, mask, cfg.epsilon / std,
                              (0 - mean) / std, (1 - mean) / std, lr=cfg.step_lr)
        previous = mix.target_fn

        def target(k: int) -> torch.Tensor:
            clean = previous(k) if previous is not None else F.one_hot(y, k).float()
            return torch.cat([clean, algo.smoothed_one_hot(y, k, cfg.smoothing).to(clean.device)])

        return Mix(torch.cat([x, x_aug]), torch.cat([y, y]), target, mix.contexts + [record])


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    """Attach Hint-Aug to `model`'s training (`vk.fit`); the model's outputs are unchanged."""
    depth = len(model.blocks)
    layer = round(depth / 3) if cfg.layer is None else cfg.layer
    if not -depth <= layer < depth:
        raise ValueError(f"hint-aug: `layer` {layer} out of range for a model with {depth} blocks")
    try:
        _check_attention(model, layer % depth)
    except NotImplementedError as err:
        raise NotImplementedError(f"hint-aug: {err}") from None
    data_config = getattr(model, "pretrained_cfg", None) or {}
    if not all(len(data_config.get(k) or ()) == 3 for k in ("mean", "std")):
        raise ValueError("hint-aug: ε is in pixel units and needs the model's normalisation, but its pretrained_cfg "
                         "has no 3-channel `mean` / `std`; load it with vk.load(..., mean=..., std=...)")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    teacher.__dict__.pop("_vitkit_augment", None)
    attach(model, "hint-aug", _HintAug(cfg, teacher, layer % depth, data_config))
    return model


register("hint-aug", kind="augment", config=Config, apply=apply, identity={"epsilon": 0.0})
