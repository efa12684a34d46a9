"""Prompt-CAM: one learned prompt per class at every layer; class c's logit is read from prompt c's output.

Paper: *Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis*, Chowdhury et al.,
CVPR 2025, arXiv:2501.09333.

Claim: VPT-deep with one prompt per class and a shared scalar head is "almost a free lunch" over VPT in accuracy,
and the target class prompt's last-layer attention heads are trait-level, localised explanations
(`vk.explain(model, image, method="prompt-cam")`, vitkit/explain/prompt_cam.py).

Plugs in at: pattern 3, the block runner's `before_block` point at every block: block 0 inserts `C` prompts
`Π_0` (C = classes) right after the prefix tokens (and prompts of methods applied earlier), blocks 1..L-1 replace
them by `Π_i`; the last block's prompt outputs are **kept** (an `after_block` function at the last block stores
them in the call's token state) and `z_c = w·norm(h_L[c]) + b`, with the model's final norm (`norm`, or
`fc_norm` on avg-pool models) and one shared `Linear(D, 1)` that replaces `model.head`. `model.forward_head` is
bound to that read-out; with `pre_logits=True` it returns timm's pooled backbone feature (B, D) (the class
prompts act on it through attention), since the class evidence is the (B, C, D) prompt outputs.
Fused SDPA is kept in training; the maps recompute the last block eagerly. Trainable: `L·C·D + D + 1`.
Layout: the reference puts prompts before the class token; vitkit keeps its `[prefix | prompts | patches]`
order (prompts have no position embedding, so this is bookkeeping: adapt.md §0), so prompt c is token `P + c`.
Works on registers, no class token, LayerScale, qk-norm, any input size and gradient checkpointing.

Hand-written here, and why: no maintained library offers class-specific prompts on a timm ViT (PEFT's prompt
tuners need a transformers `config`); the prompts reuse VPT's `Prompts` module. Differs from the reference:
vk.fit trains with AdamW (the paper: SGD, lr 0.005 on DINO); prompt dropout 0.1 as the DINO config.
Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P8, explain.md E3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vitkit.models.runner import BlockContext, check_output, get_runner
from vitkit.registry import register

from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode
from .vpt import Prompts, _insert as insert_prompts

NAME = "prompt-cam"


@dataclass(frozen=True)
class Config:
    dropout: float = field(default=0.1, metadata={
        "help": "dropout on the class prompts (the paper's DINO config; 0 for DINOv2)"})
    lr: float = field(default=1e-2, metadata={
        "help": "vk.fit's AdamW learning rate unless one is given; from the lr sweep of benchmarks/adapt_prompt.py "
                "(digits, 2 epochs: 3e-3 0.114, 1e-2 0.416, 3e-2 0.414; RESULTS.md); the paper uses SGD lr 0.005 "
                "(DINO) / 0.001 (DINOv2)"})
    weight_decay: float = field(default=1e-3, metadata={
        "help": "vk.fit's weight decay unless one is given; from the paper's DINO config"})

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"prompt-cam: `dropout` must be in [0, 1), got {self.dropout}")


def _before_block(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """Insert the class prompts before block 0, replace them by the layer's own before every later block."""
    prompts = ctx.model.prompt_cam(ctx.index, x.shape[0]).to(x.dtype)  # (B, C, D)
    state = ctx.state
    if NAME not in state.extra:  # block 0 of this forward
        return insert_prompts(x, prompts, state, key=NAME)
    start = state.extra[NAME]
    return torch.cat([x[:, :start], prompts, x[:, start + prompts.shape[1]:]], dim=1)


def _after_last_block(x: torch.Tensor, ctx: BlockContext) -> None:
    """Keep the last block's class-prompt outputs (B, C, D) for the read-out."""
    start = ctx.state.extra[NAME]
    ctx.state.extra[NAME + ":out"] = x[:, start:start + ctx.model.prompt_cam.prompts.shape[1]]


def class_logits(model: nn.Module, prompt_out: torch.Tensor) -> torch.Tensor:
    """(B, C, D) last-layer class-prompt outputs -> (B, C) logits: final norm, head dropout, shared Linear(D, 1)."""
    z = model.fc_norm(model.norm(prompt_out))
    return model.head(model.head_drop(z)).squeeze(-1)


class _ForwardHead:
    """`model.forward_head` of a Prompt-CAM model (a class, not a closure: deep-copies and pickles with it)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return VisionTransformer.forward_head(self.model, x, pre_logits=True)
        out = check_output(self.model, x, NAME).extra.get(NAME + ":out")
        if out is None:
            raise ValueError("prompt-cam: forward_head needs the class-prompt outputs of the forward that made "
                             "these features; call model(x) or forward_features(x) first")
        return class_logits(self.model, out)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if NAME in runner.owners() or hasattr(model, "prompt_cam"):
        raise ValueError("prompt-cam: already applied to this model")
    classes = getattr(model, "num_classes", 0)
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"prompt-cam: needs one prompt per class, and the model has num_classes={classes}; load it "
                         "with num_classes=C (vk.load(..., num_classes=C))")
    keep = earlier_trainable(model)
    ref = first_weight(model.patch_embed)
    with new_modules_follow_mode(model):
        model.prompt_cam = like(Prompts(len(model.blocks), classes, model.embed_dim,
                                        tuple(model.patch_embed.patch_size), cfg.dropout), ref)
        model.head = like(nn.Linear(model.embed_dim, 1), ref)
    runner.add("before_block", _before_block, owner=NAME)
    runner.add("after_block", _after_last_block, owner=NAME, blocks=[len(model.blocks) - 1])
    model.forward_head = _ForwardHead(model)
    freeze_except(model, keep | {"prompt_cam.prompts", "head.weight", "head.bias"}, train_head=False)
    return model


register(NAME, kind="adapt", config=Config, apply=apply)
