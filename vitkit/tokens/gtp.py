"""GTP-ViT: Graph-based Token Propagation, unimportant tokens pushed into their graph neighbours, then dropped.

Xu et al., *GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation*, WACV 2024,
https://arxiv.org/abs/2311.03035.

Claim: DeiT-S/B up to 26% less computation with 0.3 points drop, no fine-tuning (DeiT-B, P=8, alpha=0.1:
81.8 -> 81.46 with theta=0.6); `benchmarks/token_accuracy.py` measures the trade-off here.

Plugs in at: the block runner's `before_block` of block 0 (builds the token graph once per forward from the
embedded patches), `attn_bias` (`log s` when `token_scale`) and `after_attn` (rank, propagate, drop "between").
**Eager attention**: the ranking needs the whole attention matrix (diagonal and column sums), which fused SDPA
never materialises, so the reducing blocks run timm's own eager path (`attn.fused_attn = False`) and the
probabilities are tapped by a forward hook on `attn.attn_drop`; the matrix is used once, for both the output
and the ranking. Blocks that do not reduce keep SDPA.

Hand-written here, and why: graph, ranking and propagation (`gtp_algo.py`, torch only); the reference
re-implements timm-0.9 blocks. Differs from the reference: the semantic graph excludes self and uses exactly
`num_neighbours` neighbours; `global_pool='avg'` is weighted by the propagated sizes; all prefix tokens are
protected; the attention sparsification `theta < 1` and the `'mean'` token are not implemented (theta is off
by default in the paper's code). Docs: docs/accelerate.md. Spec: ../shared/methods/accelerate.md (A4).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register

from . import _common
from . import gtp_algo as algo
from .tome_algo import compose_source

NAME = "gtp"


@dataclass(frozen=True)
class Config:
    """GTP settings (paper defaults; `num_prop=0` leaves the model unchanged)."""

    num_prop: int = field(default=8, metadata={
        "help": "tokens propagated and dropped in each reducing block (P); 0 = no reduction"})
    alpha: float = field(default=0.1, metadata={
        "help": "propagation strength: x_keep += alpha * W[keep, prop] x_prop (0 = pure pruning)"})
    graph: Literal["mixed", "spatial", "semantic"] = field(default="mixed", metadata={
        "help": "token graph: 8-neighbourhood on the grid, k most similar tokens, or their union"})
    num_neighbours: int = field(default=8, metadata={"help": "neighbours per token of the semantic graph"})
    token_scale: bool = field(default=True, metadata={
        "help": "add log(token size) to the attention logits (sizes grow by propagation)"})
    blocks: Optional[tuple[int, ...]] = field(default=None, metadata={
        "help": "0-based blocks that propagate; None = every block"})

    def __post_init__(self):
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.num_prop < 0:
            raise ValueError(f"{NAME}: `num_prop` must be >= 0, got {self.num_prop}")
        if self.alpha < 0:
            raise ValueError(f"{NAME}: `alpha` must be >= 0, got {self.alpha}")
        if self.num_neighbours < 1:
            raise ValueError(f"{NAME}: `num_neighbours` must be >= 1, got {self.num_neighbours}")


@functools.lru_cache(maxsize=8)
def _spatial(gh: int, gw: int) -> torch.Tensor:
    return algo.spatial_graph(gh, gw)


def _build_graph(x: torch.Tensor, ctx: BlockContext, kind: str, num_neighbours: int) -> None:
    """`before_block` of block 0: the normalised token graph of this forward, over the embedded patches."""
    if ctx.index != 0:
        return None
    state = ctx.state
    patches = x[:, state.num_prefix_tokens:]
    B, n, _ = patches.shape
    graph = torch.zeros(B, n, n, device=x.device)
    if kind in ("spatial", "mixed"):
        spatial = _spatial(*state.grid).to(x.device)
        kept = state.patch_index  # timm's patch dropout kept these grid cells (in this order); None: all
        graph = graph + (spatial if kept is None else spatial[kept.unsqueeze(-1), kept.unsqueeze(-2)])
    if kind in ("semantic", "mixed"):
        graph = graph + algo.semantic_graph(patches.detach().float(), num_neighbours)
    state.extra["gtp.W"] = algo.normalise((graph > 0).float())
    state.extra["gtp.orig"] = torch.arange(n, device=x.device).expand(B, n)
    return None


def _propagate(x: torch.Tensor, ctx: BlockContext, num_prop: int, alpha: float) -> Optional[torch.Tensor]:
    """`after_attn`: rank by the tapped attention matrix, propagate the lowest-ranked tokens, drop them."""
    attn = _common.take_tap(ctx, "gtp.attn", NAME)  # (B, h, N, N), eager path
    state = ctx.state
    _common.check_state(x, state, NAME, ctx.index)
    B, N, C = x.shape
    p = state.num_prefix_tokens
    num = min(num_prop, N - p - 1)
    if num <= 0:
        return None
    prop, keep = algo.split(algo.rank(attn, p), num)  # indices among the non-prefix tokens
    orig = state.extra["gtp.orig"]
    w_all = state.extra["gtp.W"]
    o_keep, o_prop = orig.gather(1, keep), orig.gather(1, prop)
    w = w_all.gather(1, o_keep.unsqueeze(-1).expand(-1, -1, w_all.shape[-1])).gather(
        2, o_prop.unsqueeze(1).expand(-1, o_keep.shape[1], -1))  # (B, n_keep, n_prop)
    sizes = state.sizes if state.sizes is not None else torch.ones(B, N, 1, device=x.device)
    pats, s_pats = x[:, p:], sizes[:, p:]

    def take(t, idx):
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    x_keep, s_keep = algo.propagate_into(take(pats, keep), take(s_pats, keep), take(pats, prop),
                                         take(s_pats, prop), w, alpha)
    new = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    new[:, :p] = torch.arange(p, device=x.device)
    new.scatter_(1, keep + p, (p + torch.arange(keep.shape[1], device=x.device)).expand(B, -1))
    gh, gw = state.grid
    state.source = compose_source(state.source, new, p, gh * gw)
    state.sizes = torch.cat([sizes[:, :p], s_keep], dim=1)
    state.extra["gtp.orig"] = o_keep
    return torch.cat([x[:, :p], x_keep], dim=1)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)
    _common.refuse_second(model, NAME)
    blocks = _common.block_indices(model, cfg.blocks, range, "blocks", NAME)
    if not blocks:  # num_prop = 0 still registers: eager attention, graph and ranking run, nothing dropped
        return model
    for i in blocks:  # the ranking needs the full attention matrix: timm's eager path, tapped after softmax
        model.blocks[i].attn.fused_attn = False
    _common.add_taps(model, blocks, {"attn_drop": "gtp.attn"})
    runner.add("before_block", functools.partial(_build_graph, kind=cfg.graph, num_neighbours=cfg.num_neighbours),
               owner=NAME, blocks=[0])
    if cfg.token_scale:
        runner.add("attn_bias", _common.size_bias, owner=NAME)
    runner.add("after_attn", functools.partial(_propagate, num_prop=cfg.num_prop, alpha=cfg.alpha), owner=NAME,
               blocks=blocks)
    return model


register(NAME, kind="accelerate", config=Config, apply=apply, identity={"num_prop": 0})
