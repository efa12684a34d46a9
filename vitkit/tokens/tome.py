"""ToMe: Token Merging, `r` most similar token pairs merged in every block of an off-the-shelf ViT.

Bolya et al., *Token Merging: Your ViT But Faster*, ICLR 2023, https://arxiv.org/abs/2210.09461.

Claim: about 2x throughput for a 0.2-2 point top-1 drop without retraining (ViT-B/16 AugReg r=13: 84.57 ->
82.60, 309 -> 511 img/s on a V100); `benchmarks/token_reduction.py` measures the CPU ratio against timm's SDPA.

Plugs in at: the block runner's `attn_bias` (proportional attention, `log s` handed to fused SDPA as
`attn_mask`) and `after_attn` (merge "between" the attention and MLP residuals). The merge metric is the
head-averaged key of the same attention call, tapped by a forward hook on `attn.k_norm` (post qk-norm, exactly
what SDPA sees; nothing recomputed). LayerScale, qk-norm, `Attention.norm`, gates and fused SDPA are timm's own.

Hand-written here, and why: the matching and weighted merge (`tome_algo.py`, torch only) because no library
ships them apart from a timm-0.4 patch that rewrites `Block.forward`; this file only wires them to the runner.

Differs from the reference: every prefix token (class, registers, distillation, prompts from adapters) stays
in front and never merges (the reference merged registers into patches); without a class token the kept A
tokens stay in position order (the reference keeps score order); state is reset per forward by the runner, so
`forward_features` and `forward_intermediates` work; `global_pool='avg'` is size-weighted; `'map'` pooling gets
the `log s` bias. Docs: docs/accelerate.md. Spec: ../shared/methods/accelerate.md (A1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register

from . import _common
from . import tome_algo as algo
from ._viz import merge_groups, save_merge_png  # noqa: F401  (source-map visualisation)

NAME = "tome"


@dataclass(frozen=True)
class Config:
    """ToMe settings (paper defaults; `r=0` leaves the model unchanged)."""

    r: Union[int, tuple[int, ...]] = field(default=8, metadata={
        "help": "tokens merged per block: an int, or a per-block list; each block merges at most 50% of its "
                "non-prefix tokens"})
    inflect: float = field(default=0.0, metadata={
        "help": "with an int r: per-block r on a linear ramp from r(1-inflect) to r(1+inflect) "
                "(-1 = decreasing schedule 2r -> 0, 0 = constant)"})
    prop_attn: bool = field(default=True, metadata={
        "help": "proportional attention: add log(token size) to the attention logits (paper: True for "
                "supervised weights, False for MAE weights and while training)"})
    unmerge: bool = field(default=True, metadata={
        "help": "keep the patch->token source map so forward_intermediates(output_fmt='NCHW') unmerges to the "
                "grid and merges can be visualised; False makes NCHW raise"})

    def __post_init__(self):
        if isinstance(self.r, list):
            object.__setattr__(self, "r", tuple(self.r))
        values = (self.r,) if isinstance(self.r, int) else self.r
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise ValueError(f"{NAME}: `r` must be an int >= 0 or a list of them, got {self.r!r}")
        if not -1.0 <= self.inflect <= 1.0:
            raise ValueError(f"{NAME}: `inflect` must be in [-1, 1], got {self.inflect}")
        if self.inflect and not isinstance(self.r, int):
            raise ValueError(f"{NAME}: `inflect` applies to an int `r` only; got r={self.r!r}, "
                             f"inflect={self.inflect}: give either a list or (int, inflect)")


def _merge(x: torch.Tensor, ctx: BlockContext, per_block: tuple[int, ...], trace: bool) -> Optional[torch.Tensor]:
    """`after_attn`: merge this block's `r` most similar pairs, on the keys tapped from its attention."""
    k = _common.take_tap(ctx, "tome.k", NAME)  # (B, h, N, d) after k_norm
    state = ctx.state
    _common.check_state(x, state, NAME, ctx.index)
    match = algo.bipartite_soft_matching(k.mean(1), per_block[ctx.index], state.num_prefix_tokens)
    if match is None:
        return None
    n = x.shape[1]
    x, state.sizes = algo.merge_weighted(x, state.sizes, match)
    if trace:
        gh, gw = state.grid
        state.source = algo.compose_source(state.source, algo.new_positions(match, n), state.num_prefix_tokens,
                                           gh * gw)
    else:  # a source map from before (timm's patch dropout) would now be stale
        state.source = None
    return x


def per_block_r(model: nn.Module, cfg: Config) -> list[int]:
    """The configured merges per block, before the 50 % cap (see `effective_schedule`)."""
    depth = len(model.blocks)
    r = algo.schedule(depth, cfg.r, cfg.inflect)
    if len(r) != depth:
        raise ValueError(f"{NAME}: `r` lists {len(r)} values but the model has {depth} blocks")
    return r


def effective_schedule(model: nn.Module, cfg: Config, input_size: Optional[tuple[int, int]] = None) -> dict:
    """Merges and token counts per block after the 50 % cap, for an input of `input_size` (H, W) pixels.

    Counts include the prompt tokens that methods on the model insert (VPT), which ToMe protects like the
    class token: `tokens` is the sequence length after each block, as the blocks see it.
    """
    from vitkit.models.layout import token_layout
    from vitkit.models.runner import prompts_at_input

    layout = token_layout(model)
    prompts = prompts_at_input(model, input_size)
    n, p = layout.num_tokens(input_size) + prompts, layout.num_prefix_tokens + prompts
    counts = algo.token_counts(n, p, per_block_r(model, cfg))
    merged = [a - b for a, b in zip([n] + counts[:-1], counts)]
    return {"r": merged, "tokens": counts}


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-ViTs
    _common.refuse_second(model, NAME)
    r = per_block_r(model, cfg)
    blocks = [i for i, v in enumerate(r) if v > 0]
    blocks = blocks or list(range(len(r)))  # r = 0: registered all the same, merging nothing (identity tested)
    _common.add_taps(model, blocks, {"k_norm": "tome.k"})
    if cfg.prop_attn:
        runner.add("attn_bias", _common.size_bias, owner=NAME)
    runner.add("after_attn", functools.partial(_merge, per_block=tuple(r), trace=cfg.unmerge), owner=NAME,
               blocks=blocks)
    return model


register(NAME, kind="accelerate", config=Config, apply=apply, identity={"r": 0})
