"""EViT: keep the tokens the class token attends to most, fuse the rest into one token, in a few blocks.

Liang et al., *Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations*,
ICLR 2022, https://arxiv.org/abs/2202.07800.

Claim: DeiT-S trained with EViT at keep rate 0.7 + fusion: 79.5 top-1 at 3.0 GMACs (4.6 unreduced);
off the shelf (no retraining, as here) it loses more; `benchmarks/token_accuracy.py` measures how much.

Plugs in at: the block runner's `after_attn` in the `drop_loc` blocks. Only the class-token row of attention is
needed: it is computed from the `q_norm` / `k_norm` taps of the same attention call (O(N*C), not the full
N x N matrix), so fused SDPA is kept.

Hand-written here, and why: the top-k and fusion (`evit_algo.py`, torch only); the reference re-implements
timm-0.4 blocks. Differs from the reference: kept tokens stay in position order (no effect on logits); all
prefix tokens (registers, prompts) are protected. No class token: refused. The keep-rate warm-up used when
training with EViT is not implemented (this is the off-the-shelf use). Docs: docs/accelerate.md.
Spec: ../shared/methods/accelerate.md (A2).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register

from . import _common
from . import evit_algo as algo
from .tome_algo import compose_source

NAME = "evit"


@dataclass(frozen=True)
class Config:
    """EViT settings (paper defaults; `keep_rate=1` leaves the model unchanged)."""

    keep_rate: float = field(default=0.7, metadata={
        "help": "fraction of the non-prefix tokens kept at each reduction block (ceil); 1 = no reduction"})
    drop_loc: Optional[tuple[int, ...]] = field(default=None, metadata={
        "help": "0-based blocks that reduce tokens; None = depth/4, depth/2, 3*depth/4 (3, 6, 9 for 12 blocks, "
                "the paper's setting)"})
    fuse_token: bool = field(default=True, metadata={
        "help": "append one token: the class-attention-weighted sum of the dropped tokens"})

    def __post_init__(self):
        if isinstance(self.drop_loc, list):
            object.__setattr__(self, "drop_loc", tuple(self.drop_loc))
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"{NAME}: `keep_rate` must be in (0, 1], got {self.keep_rate}")


def drop_blocks(model: nn.Module, cfg: Config) -> list[int]:
    """The blocks that drop tokens: `cfg.drop_loc`, or those at a quarter, half and three quarters of the depth."""
    return _common.block_indices(model, cfg.drop_loc, lambda depth: [depth * i // 4 for i in (1, 2, 3)], "drop_loc",
                                 NAME)


def _reduce(x: torch.Tensor, ctx: BlockContext, keep_rate: float, fuse: bool) -> Optional[torch.Tensor]:
    """`after_attn`: keep the top-k tokens by class attention (computed from the tapped q/k), fuse the rest."""
    q = _common.take_tap(ctx, "evit.q", NAME)
    k = _common.take_tap(ctx, "evit.k", NAME)
    state = ctx.state
    _common.check_state(x, state, NAME, ctx.index)
    B, N, _ = x.shape
    p = state.num_prefix_tokens
    keep = algo.num_keep(N - p, keep_rate)
    if keep >= N - p:
        return None
    cls = state.layout.cls_index
    scores = algo.cls_attention(q[:, :, cls], k, ctx.block.attn.scale)
    x, kept, dropped = algo.keep_topk(x, scores, p, keep, fuse)
    sizes = state.sizes if state.sizes is not None else torch.ones(B, N, 1, device=x.device)
    parts = [sizes[:, :p], sizes.gather(1, kept.unsqueeze(-1))]
    if fuse:
        parts.append(sizes.gather(1, dropped.unsqueeze(-1)).sum(1, keepdim=True))
    state.sizes = torch.cat(parts, dim=1)
    gh, gw = state.grid
    state.source = compose_source(state.source, algo.new_positions(kept, dropped, p, N, fuse), p, gh * gw)
    return x


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)
    _common.require_class_token(model, NAME)
    _common.refuse_second(model, NAME)
    blocks = drop_blocks(model, cfg)
    if not blocks:  # keep_rate = 1 still registers: every block keeps all tokens (identity tested)
        return model
    _common.add_taps(model, blocks, {"q_norm": "evit.q", "k_norm": "evit.k"})
    runner.add("after_attn", functools.partial(_reduce, keep_rate=cfg.keep_rate, fuse=cfg.fuse_token),
               owner=NAME, blocks=blocks)
    return model


register(NAME, kind="accelerate", config=Config, apply=apply, identity={"keep_rate": 1.0})
