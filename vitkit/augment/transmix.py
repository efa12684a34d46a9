"""TransMix: CutMix labels re-weighted by the class token's attention inside the pasted box.

Paper: *TransMix: Attend to Mix for Vision Transformers* (Chen et al., CVPR 2022), arXiv:2111.09833.
*Claim.* No parameters, no extra FLOPs; about +1% ImageNet top-1 on ViT-family models. Implemented: per batch
(with probability `prob`) timm-style Mixup or CutMix (`switch_prob` chooses CutMix); for a CutMix batch the
partner's share of the target is `λ = (λ_area + λ_attn) / 2`, where `λ_area` = box area / image area and
`λ_attn` = Σ over patches in the box of the last block's class→patch attention (mean over heads) / Σ over all
patches; target `(1-λ)·y + λ·flip(y)`. Mixup batches keep the standard targets.

*Plugs in at.* `vk.fit` (vitkit.augment's batch protocol): the pixels are mixed before the forward; read-only
forward hooks on the last block's `attn.q_norm` / `attn.k_norm` recompute the class row of the softmax from the
same q and k that fused SDPA sees (vitkit.explain.attention's recomputation, detached, class row only), so SDPA
stays on and gradient checkpointing keeps working; the label is formed after the forward.

*Hand-written here, and why.* timm's `Mixup` mixes labels by area only and does not return its box;
`timm.data.mixup.cutmix_bbox_and_lam` (box and corrected λ) and timm's one-hot conventions are used. The
attention-weighted label is a few tensor operations (`transmix_algo.py`).

*Differs from the reference.* Its `transmix_label` hard-codes `.cuda()` and needs a patched timm model that
returns attention; here any timm ViT with a class token works (registers, prompts, LayerScale, qk-norm, any
input size). `box_mode="coverage"` (share of each patch inside the box) is offered beside the reference's
nearest sampling. Refused: models without a class token, and token reduction during training (the last block
must see the full grid).

Spec: ../shared/methods/augment-pretrain.md (D1). Docs: docs/pretrain.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.augment._common import Mix, attach
from vitkit.explain.attention import _check_attention, _softmax_attention  # same recomputation as vk.attention
from vitkit.models.layout import token_layout
from vitkit.models.runner import get_runner, has_runner
from vitkit.registry import register

from . import transmix_algo as algo


@dataclass(frozen=True)
class Config:
    prob: float = field(default=1.0, metadata={"help": "chance that a batch is mixed (Mixup or CutMix)"})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Beta(α, α) of Mixup's λ; 0: CutMix only"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "Beta(α, α) of CutMix's λ; 0: Mixup only"})
    switch_prob: float = field(default=0.8, metadata={
        "help": "chance of CutMix (with attention labels) rather than Mixup when both alphas are > 0"})
    box_mode: Literal["nearest", "coverage"] = field(default="nearest", metadata={
        "help": "patch in the box: nearest (its sampled top-left pixel, the reference's) or coverage (its share)"})

    def __post_init__(self):
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"transmix: `{name}` must be in [0, 1], got {getattr(self, name)}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"transmix: `{name}` must be >= 0, got {getattr(self, name)}")
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("transmix: `mixup_alpha` and `cutmix_alpha` are both 0: nothing to mix; set one > 0 "
                             "or set `prob` to 0")


class _ClassAttention:
    """Hooks on the last block: its class→token attention row (B, N), mean over heads, detached."""

    def __init__(self, model: nn.Module):
        self.model, self.row, self.reduced = model, None, False

    @contextmanager
    def __call__(self):
        attn = self.model.blocks[-1].attn
        pending = {}

        def on_q(module, args, out):
            pending["q"] = out.detach()

        def on_k(module, args, out):
            q = pending.pop("q")
            cls = token_layout(self.model).cls_index
            a = _softmax_attention(attn, q[:, :, cls:cls + 1], out.detach(), None, False)  # (B, h, 1, N)
            self.row = a[:, :, 0].mean(1)
            state = get_runner(self.model).state if has_runner(self.model) else None
            self.reduced = state is not None and (state.source is not None or state.patch_index is not None)

        handles = [attn.q_norm.register_forward_hook(on_q), attn.k_norm.register_forward_hook(on_k)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def grid_map(self, grid: tuple[int, int]) -> torch.Tensor:
        """(B, gh, gw) attention to the patches (the last gh·gw tokens: prefix and prompts come first)."""
        gh, gw = grid
        layout = token_layout(self.model)
        if self.row is None:
            raise RuntimeError("transmix: the last block's attention was not captured during the forward")
        if self.reduced or self.row.shape[1] < layout.num_prefix_tokens + gh * gw:
            raise NotImplementedError(
                f"transmix: the last block sees {self.row.shape[1]} tokens, fewer than the {gh}x{gw} patches plus "
                "prefix: token reduction (tome, evit, ats, gtp) or patch dropout is active in training; TransMix "
                "needs the full grid at the last block, so apply token reduction after training")
        return self.row[:, -gh * gw:].reshape(-1, gh, gw)


class _TransMix:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, model: nn.Module, mix: Mix, extras) -> Mix:
        cfg = self.cfg
        if torch.rand(()).item() >= cfg.prob:
            return mix
        x, labels, previous = mix.images, mix.labels, mix.target_fn
        cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or np.random.rand() < cfg.switch_prob)
        alpha = cfg.cutmix_alpha if cutmix else cfg.mixup_alpha
        lam_timm = float(np.random.beta(alpha, alpha))  # timm's λ: the original's share

        def base(k: int) -> torch.Tensor:  # the targets before this mix (soft when an earlier step mixed)
            return previous(k) if previous is not None else F.one_hot(labels, k).float()

        if not cutmix:
            return Mix(algo.blend(x, 1 - lam_timm), labels, lambda k: algo.mix_targets(base(k), 1 - lam_timm),
                       mix.contexts)
        from timm.data.mixup import cutmix_bbox_and_lam

        H, W = x.shape[-2:]
        (yl, yh, xl, xh), lam_timm = cutmix_bbox_and_lam(x.shape, lam_timm, correct_lam=True)
        box, lam_area = (int(yl), int(yh), int(xl), int(xh)), 1.0 - float(lam_timm)
        grid = token_layout(model).grid((H, W))
        watch = _ClassAttention(model)

        def target(k: int) -> torch.Tensor:
            box_grid = algo.box_on_grid(box, (H, W), grid, cfg.box_mode).to(x.device)
            lam = algo.attention_lambda(watch.grid_map(grid), box_grid, lam_area)
            return algo.mix_targets(base(k), lam)

        return Mix(algo.paste(x, box), labels, target, mix.contexts + [watch])


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    """Attach TransMix to `model`'s training (`vk.fit`); the model's outputs are unchanged."""
    if token_layout(model).cls_index is None:
        raise NotImplementedError(
            "transmix: needs a class token (its last-block attention weighs the pasted box) and this model has "
            "none (global_pool='avg'); train with plain CutMix/Mixup (timm.data.Mixup) instead")
    try:
        _check_attention(model, len(model.blocks) - 1)
    except NotImplementedError as err:
        raise NotImplementedError(f"transmix: {err}") from None
    attach(model, "transmix", _TransMix(cfg))
    return model


register("transmix", kind="augment", config=Config, apply=apply, identity={"prob": 0.0})
