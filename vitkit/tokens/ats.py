"""ATS: Adaptive Token Sampling, parameter-free inverse-transform sampling of tokens by significance.

Fayyaz et al., *Adaptive Token Sampling For Efficient Vision Transformers*, ECCV 2022,
https://arxiv.org/abs/2111.15667.

Claim: about 2x fewer GFLOPs while preserving accuracy (ImageNet, Kinetics), with a per-image token count;
`benchmarks/token_accuracy.py` measures the off-the-shelf accuracy / FLOPs trade-off here.

Plugs in at: the block runner's `after_attn` of the ATS blocks (sampling "between"; the sampled rows go on to
the MLP and later blocks) and `attn_bias` (a -inf key mask on padding slots, as `log` of size 0, handed to fused
SDPA). Scores use the class-token attention row, computed from the `q_norm` / `k_norm` taps (O(N*C)), and the
value norms from the `qkv` tap; SDPA is kept.

Hand-written here, and why: the sampling (`ats_algo.py`, torch only); the reference re-implements timm-0.4
blocks. Differs from the reference: (1) sampling runs per image on its real tokens and the batch is padded with
a key mask, so one image's output never depends on the other images in its batch (the reference's batched
`DROP_TOKENS=True` path breaks this); (2) attention is computed for all query rows of an ATS block and the
unsampled rows are discarded afterwards (the reference computes only the sampled rows: the same outputs, a
little more attention compute here, because the runner calls timm's own `Attention` unchanged); (3) `K` may be
set below `N_0` as a budget knob. No class token: refused. Docs: docs/accelerate.md.
Spec: ../shared/methods/accelerate.md (A3).
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
from . import ats_algo as algo
from .evit_algo import cls_attention
from .tome_algo import compose_source

NAME = "ats"


@dataclass(frozen=True)
class Config:
    """ATS settings (paper defaults; `blocks=()` leaves the model unchanged)."""

    blocks: Optional[tuple[int, ...]] = field(default=None, metadata={
        "help": "0-based blocks that sample tokens; None = from depth/4 to the last block (3..11 for 12 blocks, "
                "the DeiT-S reference); () = none"})
    num_samples: int = field(default=0, metadata={
        "help": "K: at most K-1 tokens kept per ATS block; 0 = the initial token count N_0 (197 for ViT-B/16)"})

    def __post_init__(self):
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.num_samples < 0 or self.num_samples == 1:
            raise ValueError(f"{NAME}: `num_samples` must be 0 (= N_0) or >= 2, got {self.num_samples}")


def ats_blocks(model: nn.Module, cfg: Config) -> list[int]:
    """The blocks that sample: `cfg.blocks`, or the last three quarters of the model."""
    return _common.block_indices(model, cfg.blocks, lambda depth: range(depth // 4, depth), "blocks", NAME)


def _sample(x: torch.Tensor, ctx: BlockContext, num_samples: int) -> Optional[torch.Tensor]:
    """`after_attn`: sample each image's tokens by significance, pad the batch, mask the padding."""
    q = _common.take_tap(ctx, "ats.q", NAME)
    k = _common.take_tap(ctx, "ats.k", NAME)
    qkv = _common.take_tap(ctx, "ats.qkv", NAME)
    state = ctx.state
    _common.check_state(x, state, NAME, ctx.index)
    B, N, C = x.shape
    p = state.num_prefix_tokens
    K = num_samples or (state.layout.num_prefix_tokens + state.grid[0] * state.grid[1])
    bias = _common.log_size_bias(x, state)
    cls = state.layout.cls_index
    attn = cls_attention(q[:, :, cls], k, ctx.block.attn.scale, None if bias is None else bias[:, :, 0])
    attn = attn * q.shape[1]  # sum over heads
    v = qkv[..., -C:]
    sizes = state.sizes if state.sizes is not None else torch.ones(B, N, 1, device=x.device)
    picks = []
    for b in range(B):  # per image: its real candidate tokens only
        cand = (sizes[b, p:, 0] > 0).nonzero().flatten() + p
        picks.append(cand[algo.inverse_transform_sample(algo.significance(attn[b, cand], v[b, cand]), K)])
    width = max(len(t) for t in picks)
    new_x = x.new_zeros(B, p + width, C)
    new_sizes = sizes.new_zeros(B, p + width, 1)
    new = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    new_x[:, :p], new_sizes[:, :p] = x[:, :p], sizes[:, :p]
    new[:, :p] = torch.arange(p, device=x.device)
    for b, idx in enumerate(picks):
        new_x[b, p:p + len(idx)] = x[b, idx]
        new_sizes[b, p:p + len(idx)] = sizes[b, idx]
        new[b, idx] = p + torch.arange(len(idx), device=x.device)
    gh, gw = state.grid
    state.source = compose_source(state.source, new, p, gh * gw)
    state.sizes = new_sizes
    return new_x


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)
    _common.require_class_token(model, NAME)
    _common.refuse_second(model, NAME)
    blocks = ats_blocks(model, cfg)  # blocks=() still registers (the padding bias runs everywhere, samples nowhere)
    _common.add_taps(model, blocks, {"q_norm": "ats.q", "k_norm": "ats.k", "qkv": "ats.qkv"})
    runner.add("attn_bias", _common.size_bias, owner=NAME)  # -inf on padding slots (size 0)
    runner.add("after_attn", functools.partial(_sample, num_samples=cfg.num_samples), owner=NAME, blocks=blocks)
    return model


register(NAME, kind="accelerate", config=Config, apply=apply, identity={"blocks": ()})
