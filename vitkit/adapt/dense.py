"""Dense: a per-patch head on intermediate tokens, for segmentation (land cover) and density regression.

Paper: *PhilEO Bench* (Fibaek et al., 2024, arXiv:2401.04464) with *MajorTOM* (arXiv:2402.12095): Earth-observation
foundation models judged by n-shot land-cover segmentation and building / road density regression on 10-band
Sentinel-2 tiles, a head trained on n = 8 ... 128 labelled tiles over a frozen backbone.

Claim implemented: the frozen (or adapted) ViT's patch tokens at chosen blocks carry enough to predict a label or a
density for every patch with one linear map per patch; with the `channels` adapter, bands an RGB image lacks
raise land-cover mIoU where the classes differ only in those bands. Measured (benchmarks/RESULTS.md, embedded ViT,
procedural tiles, 3 seeds): land-cover mIoU 0.904 / 0.934 / 0.946 at n = 8 / 32 / 128 with all 10 bands vs 0.139 /
0.148 / 0.134 from RGB; road / building density MSE 0.0030 / 0.0020 / 0.0021 vs 0.0025 / 0.0021 / 0.0019 from RGB
(predicting the mean: 0.0229), which shows them as well.

Plugs in at: `forward_intermediates` of the block runner (prompts stripped, merged tokens unmerged onto the grid,
prefix tokens - class, registers, distillation - dropped by the token layout). The tokens of `blocks` (after the
final norm when `norm`) are concatenated or summed, `(B, D', gh, gw)` in row-major patch order, mapped to `outputs`
values per patch by `model.dense_head` (a Linear, i.e. a 1x1 convolution), optionally upsampled bilinearly to the
input's pixels. `model(x)` returns `(B, outputs, gh, gw)` (or `(B, outputs, H, W)`); `vk.fit(model, train)` trains
with per-patch cross-entropy (`segment`; targets `(B, gh, gw)` class indices) or MSE (`regress`; targets
`(B, outputs, gh, gw)` floats; `(B, gh, gw)` when `outputs` is 1): `model.computes_loss` makes `fit` call
`model(images, targets) -> (logits, loss, labels)` (so `fit`'s `train_acc` is the per-patch accuracy;
regression reports none). `vk.evaluate(model, data, protocol="dense")` gives mIoU and
pixel accuracy, or MSE. Trainable: the dense head, and what adapters applied before train (not the classifier
head, which the dense model does not use). Saves/loads through `vk.save` / `vk.load`.
Hand-written here, and why: timm gives the intermediate tokens but no head over them; segmentation libraries
(mmsegmentation, segmentation-models-pytorch) bring their own backbones and decoders, not a linear head over a timm
ViT's runner-aware tokens, and the head is one Linear. Differs from the reference: PhilEO's heads are convolutional
decoders; this is the linear per-patch probe. Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.runner import _Bound, forward_intermediates, get_runner
from vitkit.registry import register

from . import dense_algo as algo
from ._common import earlier_trainable, first_weight, freeze_except, head_parameter_names, like, \
    new_modules_follow_mode


@dataclass(frozen=True)
class Config:
    OUTPUT: ClassVar[str] = "per-patch maps (B, outputs, gh, gw)"  # bench: not a classifier (recipe.make_chain)
    task: Literal["segment", "regress"] = field(default="segment", metadata={
        "help": "segment: one class per patch (cross-entropy, mIoU); regress: `outputs` values per patch (MSE), "
                "e.g. road and building density"})
    outputs: int = field(default=0, metadata={
        "help": "values per patch: classes (segment) or regressed quantities (regress); 0: the model's num_classes"})
    blocks: tuple[int, ...] = field(default=(-1,), metadata={
        "help": "the blocks whose output tokens feed the head (negative counts from the last)"})
    combine: Literal["concat", "sum"] = field(default="concat", metadata={
        "help": "how the blocks' tokens join: concatenated (width D x len(blocks)) or summed (width D)"})
    norm: bool = field(default=True, metadata={
        "help": "apply the model's final norm to every tapped block's tokens (timm's forward_intermediates norm; "
                "Identity on avg-pool models, whose fc_norm acts after pooling)"})
    upsample: bool = field(default=False, metadata={
        "help": "upsample the per-patch maps bilinearly to the input's pixels (targets then per pixel)"})
    lr: float = field(default=3e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's tiles task, "
                "not swept)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given (0: from the tiles demo's unregularised linear "
                "head, as a linear probe)"})

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.outputs < 0:
            raise ValueError(f"dense: `outputs` must be >= 0 (0: the model's num_classes), got {self.outputs}")
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"dense: `blocks` must name at least one block, each once, got {list(self.blocks)}")


class DenseHead(nn.Module):
    """`model.dense_head`: the Linear over the combined tokens of `blocks` (non-negative, in block order)."""

    def __init__(self, cfg: Config, blocks: tuple[int, ...], width: int, outputs: int):
        super().__init__()
        self.cfg, self.blocks, self.outputs = cfg, blocks, outputs
        self.proj = nn.Linear(width * (len(blocks) if cfg.combine == "concat" else 1), outputs)
        nn.init.zeros_(self.proj.weight)  # a linear probe needs no random start: the same head on every run
        nn.init.zeros_(self.proj.bias)

    def forward(self, grids: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        y = algo.per_patch(algo.combine(grids, self.cfg.combine), self.proj.weight, self.proj.bias)
        return algo.upsample(y, size) if self.cfg.upsample else y


def _check_targets(head: DenseHead, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    B, K, h, w = y.shape
    where = "pixel" if head.cfg.upsample else "patch"
    if head.cfg.task == "segment":
        if targets.shape != (B, h, w) or targets.is_floating_point():
            raise ValueError(f"dense: segment targets must be class indices of shape (B, {h}, {w}) (one per {where}), "
                             f"got {tuple(targets.shape)} {targets.dtype}")
        if len(targets) and (targets.min() < 0 or targets.max() >= K):
            raise ValueError(f"dense: segment targets must lie in [0, {K - 1}] ({K} outputs), got "
                             f"{int(targets.min())}..{int(targets.max())}")
        return targets.long()
    if K == 1 and targets.shape == (B, h, w):
        targets = targets[:, None]
    if targets.shape != (B, K, h, w) or not targets.is_floating_point():
        raise ValueError(f"dense: regress targets must be floats of shape (B, {K}, {h}, {w}) (one value per output "
                         f"and {where}), got {tuple(targets.shape)} {targets.dtype}")
    return targets


def _forward(model: nn.Module, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
    """`model(x)`: per-patch maps; `model(x, targets)` (what `vk.fit` calls): (logits, loss, labels)."""
    head: DenseHead = model.dense_head
    grids = forward_intermediates(model, images, indices=list(head.blocks), norm=head.cfg.norm, output_fmt="NCHW",
                                  intermediates_only=True, stop_early=True)  # [(B, D, gh, gw)], prefix dropped
    y = head(grids, tuple(images.shape[-2:]))
    if targets is None:
        return y
    targets = _check_targets(head, y, targets)
    if head.cfg.task == "regress":
        return y, F.mse_loss(y.float(), targets.float()), None  # no labels: fit reports no accuracy
    logits = y.float().permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, K): fit's accuracy is per patch (pixel)
    return logits, F.cross_entropy(logits, targets.flatten()), targets.flatten()


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    get_runner(model)  # NotImplementedError for non-timm ViTs
    if getattr(model.patch_embed, "token_grid", None) is not None:
        raise NotImplementedError("dense: needs an image patch grid; this model's input adapter (video, points) makes "
                                  "tokens of another kind")
    if hasattr(model, "dense_head"):
        raise ValueError("dense: the model has a dense head already; load a fresh model for another one")
    depth = len(model.blocks)
    bad = [b for b in cfg.blocks if not -depth <= b < depth]
    if bad:
        raise ValueError(f"dense: `blocks` {bad} out of range for a {depth}-block model (valid: {-depth}..{depth - 1})")
    blocks = tuple(sorted({b % depth for b in cfg.blocks}))
    if len(blocks) != len(cfg.blocks):
        raise ValueError(f"dense: `blocks` {list(cfg.blocks)} name the same block twice")
    outputs = cfg.outputs or int(getattr(model, "num_classes", 0) or 0)
    if outputs < 1:
        raise ValueError("dense: the model has no classifier (num_classes=0) to take `outputs` from; set `outputs`")
    keep = earlier_trainable(model) - head_parameter_names(model)
    with new_modules_follow_mode(model):
        model.dense_head = like(DenseHead(cfg, blocks, model.embed_dim, outputs), first_weight(model.patch_embed))
    model.forward = _Bound(_forward, model)
    model.computes_loss = True  # vk.fit: model(images, targets) -> (logits, loss, labels)
    freeze_except(model, keep | {f"dense_head.{n}" for n, _ in model.dense_head.named_parameters()}, train_head=False)
    return model


@torch.inference_mode()
def evaluate(model: nn.Module, data, batch_size: int = 256) -> dict:
    """`vk.evaluate(model, data, protocol="dense")`: mIoU, per-class IoU and pixel accuracy (segment) or MSE and
    per-output MSE (regress) of a dense model over `data` (`(image, target)` pairs, targets as `vk.fit` takes)."""
    head = getattr(model, "dense_head", None)
    if not isinstance(head, DenseHead):
        raise ValueError("evaluate: protocol `dense` needs a dense head: vk.adapt(model, 'dense', ...) and vk.fit "
                         "first")
    if len(data) == 0:
        raise ValueError("evaluate: protocol `dense` got an empty dataset")
    was_training = model.training
    model.eval()
    device = first_weight(head).device
    k = head.outputs
    matrix, sq, n = torch.zeros(k, k, dtype=torch.long), torch.zeros(k, dtype=torch.float64), 0
    for images, targets in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
        y = model(images.to(device)).float().cpu()
        targets = _check_targets(head, y, torch.as_tensor(targets))
        if head.cfg.task == "segment":
            matrix += algo.confusion(y.argmax(1), targets, k)
        else:
            sq += ((y - targets) ** 2).double().sum((0, 2, 3))
        n += len(images)
    model.train(was_training)
    if head.cfg.task == "regress":
        cells = n * y.shape[-1] * y.shape[-2]
        per_output = (sq / cells).tolist()
        return {"protocol": "dense", "task": "regress", "mse": sum(per_output) / k, "per_output_mse": per_output,
                "n": n}
    miou, per_class = algo.iou_from_confusion(matrix)
    return {"protocol": "dense", "task": "segment", "miou": miou, "per_class_iou": per_class,
            "pixel_acc": float(matrix.diag().sum() / matrix.sum().clamp(min=1)), "confusion": matrix.tolist(), "n": n}


register("dense", kind="adapt", config=Config, apply=apply)
