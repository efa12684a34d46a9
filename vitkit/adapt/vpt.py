"""VPT, Visual Prompt Tuning: learned tokens after the prefix tokens, at the input (shallow) or every layer (deep).

Paper: *Visual Prompt Tuning*, Jia et al., ECCV 2022, arXiv:2203.12119.

Claim: with < 1% of the parameters, prompts on a frozen ViT rival full fine-tuning; VPT-deep beats it on many
VTAB-1k tasks (71.96 vs 68.96).

Plugs in at: pattern 3, the block runner's `before_block` point. Block 0 inserts `n` prompts right after all
prefix tokens (class token, registers, and prompts of methods applied earlier): `[prefix | prompts | patches]`;
they have no position embedding. Deep (`deep=True`) replaces them with the next layer's prompts before every
later block (replace, never accumulate). The token state counts them (`TokenState.num_prompts`), so token
reduction never touches them and the runner strips them before the final norm, pooling and
`forward_intermediates`. Fused SDPA is kept. Trainable: prompts (+ the head). Counts: shallow nD, deep LnD.
`n = 0` registers the same hook with zero prompts (the identity runs the real path). Prompts take the dtype and
device of the patch embedding.

Hand-written here, and why: PEFT's prompt tuners need a transformers `config` and fail on a timm
`VisionTransformer`. Differs from the reference: the optional prompt projection is not offered; the frozen
backbone's dropout follows `model.train()` (timm ViTs default to no dropout). Docs: docs/adapt.md.
Spec: ../shared/methods/adapt.md P3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.runner import BlockContext, TokenState, get_runner
from vitkit.registry import alias, register

from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode


@dataclass(frozen=True)
class Config:
    num_prompts: int = field(default=5, metadata={"help": "prompt tokens n per layer (0: exact identity)"})
    deep: bool = field(default=False, metadata={"help": "fresh prompts before every block (VPT-deep) instead of "
                                                        "at the input only (VPT-shallow)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the prompt tokens"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for VPT (AdamW, batch 64, 100"
                " epochs; V-PETL Bench uses it too; shared/methods/bench.md §4); the paper tunes an SGD lr grid per "
                "task"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})

    def __post_init__(self):
        if self.num_prompts < 0:
            raise ValueError(f"vpt: `num_prompts` must be >= 0, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vpt: `dropout` must be in [0, 1), got {self.dropout}")


class Prompts(nn.Module):
    """The prompt tokens `(L or 1, n, D)`, initialised `U(-v, v)` with `v = sqrt(6 / (3·p_h·p_w + D))`."""

    def __init__(self, layers: int, n: int, dim: int, patch_size: tuple[int, int], dropout: float):
        super().__init__()
        v = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))
        self.prompts = nn.Parameter(torch.empty(layers, n, dim).uniform_(-v, v))
        self.dropout = dropout

    def forward(self, layer: int, batch: int) -> torch.Tensor:  # -> (B, n, D)
        p = F.dropout(self.prompts[layer], self.dropout, self.training)
        return p.unsqueeze(0).expand(batch, -1, -1)


def _insert(x: torch.Tensor, prompts: torch.Tensor, state: TokenState, key: str = "vpt") -> torch.Tensor:
    """Insert prompts after the prefix and earlier prompts; update the token state (their start index under
    `state.extra[key]`); return the new sequence."""
    start, n = state.num_prefix_tokens, prompts.shape[1]
    state.extra[key] = start
    state.num_prompts += n
    if state.sizes is not None:
        state.sizes = torch.cat([state.sizes[:, :start], state.sizes.new_ones(x.shape[0], n, 1),
                                 state.sizes[:, start:]], dim=1)
    if state.source is not None:
        state.source = torch.where(state.source >= start, state.source + n, state.source)
    return torch.cat([x[:, :start], prompts.to(x.dtype), x[:, start:]], dim=1)


def _before_block(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    module: Prompts = ctx.model.vpt
    state = ctx.state
    if "vpt" not in state.extra:  # first block of this forward: insert
        return _insert(x, module(ctx.index if module.prompts.shape[0] > 1 else 0, x.shape[0]), state)
    if module.prompts.shape[0] == 1:  # shallow: prompts travel through the blocks
        return x
    start, n = state.extra["vpt"], module.prompts.shape[1]  # deep: replace this layer's prompts
    return torch.cat([x[:, :start], module(ctx.index, x.shape[0]).to(x.dtype), x[:, start + n:]], dim=1)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if "vpt" in runner.owners() or hasattr(model, "vpt"):
        raise ValueError("vpt: already applied to this model")
    keep = earlier_trainable(model)
    layers = len(model.blocks) if cfg.deep else 1
    ps = tuple(model.patch_embed.patch_size)
    with new_modules_follow_mode(model):  # n = 0 registers too (0 prompts): the identity runs the same path
        model.vpt = like(Prompts(layers, cfg.num_prompts, model.embed_dim, ps, cfg.dropout),
                         first_weight(model.patch_embed))
    runner.add("before_block", _before_block, owner="vpt", blocks=None if cfg.deep else [0])
    freeze_except(model, keep | {"vpt.prompts"}, cfg.train_head)
    return model


register("vpt", kind="adapt", config=Config, apply=apply, identity={"num_prompts": 0})
alias("vpt-deep", of="vpt", deep=True)
