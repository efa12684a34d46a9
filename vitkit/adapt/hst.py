"""HST, Hierarchical Side-Tuning: a 4-stage side network with meta-registers reads a frozen ViT's intermediates and
produces multi-scale dense features (classification, segmentation, detection).

Paper: *Hierarchical Side-Tuning for Vision Transformers*, Lin et al., 2023, arXiv:2310.05393.

Claim: with 0.78 M trainable parameters on ViT-B/16, the side network beats other PETL methods on VTAB-1k (mean
76.0, best on 13 of 19 tasks) and, being a feature pyramid, serves dense prediction (COCO Cascade Mask R-CNN 49.7
box AP, above full fine-tuning).

Plugs in at: pattern 3 + taps. The block runner's `before_block` inserts layer `l`'s meta-register `m_l` (Xavier
init) right after the class token and registers (no position embedding); `after_block` takes its
output `r_l` and the patch map `F_l` (B, D, gh, gw), drops the meta-register again, and runs side block `l` on
them (`hst_layer.Stage.step`): cross-attention from the side tokens to `[LN(T(r_l)), mean(T(F_l))]`, then
`+= T(bilinear_resize(F_l))`, then an MLP. Stage `s` reads 4 contiguous, as-even-as-possible groups of layers
(ViT-B: (0-2, 3-5, 6-8, 9-11)); the stem reads the image (a pre-hook on `patch_embed`). Dims (32, 48, 64, 72),
heads (2, 4, 8, 12): grids 1/4, 1/8, 1/16, 1/32 of the input. The classification read-out (`forward_head`) is
mean → `BatchNorm1d(affine=False)` → `head` (a new `Linear(72, classes)`), so `pre_logits` features have 72
channels (`model.num_features`); it reads the side features of the forward that returned its input, so it
takes only the tensor this thread's latest `forward_features` (or `forward_intermediates`) returned and raises
a ValueError for any other (an earlier batch's features would get this batch's side features).
`forward_dense(model, x)` returns the four maps. Fused SDPA is kept; gradients pass through the frozen ViT (not
memory-light). Trainable: side network, meta-registers, bridges, head and every LayerNorm of the ViT.

Hand-written here, and why: no library has a side network on timm ViTs; the reference (AFeng-x/HST, no licence)
pins timm 0.6.5, assumes one class token and has no dense-prediction code. The side network is
`hst_layer.py` (plain torch). Differs from the reference: meta-registers sit after the prefix (bookkeeping only:
they have no position embedding); registers and no-class-token models are supported. Docs: docs/adapt.md.
Spec: ../shared/methods/adapt.md P10.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, TokenState, _Bound, check_output, get_runner
from vitkit.registry import register

from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode
from .explora import is_norm
from .hst_layer import SideNetwork


@dataclass(frozen=True)
class Config:
    dims: tuple[int, ...] = field(default=(32, 48, 64, 72), metadata={"help": "width of each of the 4 side stages"})
    heads: tuple[int, ...] = field(default=(2, 4, 8, 12), metadata={"help": "cross-attention heads per stage"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "side-block MLP hidden width / stage width"})
    train_norms: bool = field(default=True, metadata={"help": "train every LayerNorm of the ViT (the paper does)"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head (on the side features)"})
    lr: float = field(default=1e-2, metadata={"help": "vk.fit's learning rate unless one is given; from the paper's "
                                                     "VTAB-1k recipe (AdamW 1e-2, batch 32, 100 epochs)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "vk.fit's weight decay unless one is given; from "
                                                                "the paper (5e-4)"})

    def __post_init__(self):
        if len(self.dims) != 4 or len(self.heads) != 4:
            raise ValueError(f"hst: `dims` and `heads` need 4 entries (one per stage), got {self.dims}, {self.heads}")
        bad = [(d, h) for d, h in zip(self.dims, self.heads) if h < 1 or d < 1 or d % h]
        if bad:
            raise ValueError(f"hst: each stage width must be a positive multiple of its heads, got (dim, heads) {bad}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"hst: `mlp_ratio` must be > 0, got {self.mlp_ratio}")


def _capture_image(model: nn.Module, module: nn.Module, args: tuple) -> None:
    """Pre-hook on `patch_embed`: the stem reads the image the ViT embeds in this call."""
    state = get_runner(model).state
    if state is not None:  # None: patch_embed called on its own, outside any forward of the model
        state.extra["hst"] = {"image": args[0]}


def _before_block(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    state = ctx.state
    if state.sizes is not None or state.source is not None:
        raise ValueError("hst: tokens were merged or dropped before this block (token reduction or patch dropout); "
                         "the side network needs every patch of the grid: remove that method or patch_drop_rate")
    # right after the class token / registers, before other methods' prompts: removed again after this block,
    # so between blocks the sequence is exactly what it would be without HST (VPT-deep's positions hold)
    pos, meta = state.layout.num_prefix_tokens, ctx.model.hst.meta[ctx.index]  # (1, D)
    state.num_prompts += 1
    return torch.cat([x[:, :pos], meta.to(x.dtype).expand(x.shape[0], -1, -1), x[:, pos:]], dim=1)


def _after_block(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    state: TokenState = ctx.state
    side: SideNetwork = ctx.model.hst
    hst = state.extra["hst"]
    pos = state.layout.num_prefix_tokens
    meta, x = x[:, pos], torch.cat([x[:, :pos], x[:, pos + 1:]], dim=1)  # (B, D); the meta-register leaves
    state.num_prompts -= 1
    (gh, gw), b = state.grid, x.shape[0]
    patches = x[:, state.num_prefix_tokens:]
    if patches.shape[1] != gh * gw:
        raise ValueError(f"hst: block {ctx.index} left {patches.shape[1]} patch tokens for a {gh}x{gw} grid; the "
                         "side network needs the full grid (no token reduction)")
    fmap = patches.transpose(1, 2).reshape(b, -1, gh, gw)  # (B, D, gh, gw)
    s, j = side.where(ctx.index)
    y = hst.get("x")
    if j == 0:  # a new stage: the stem on the image, or the previous stage's map downsampled
        y = side.stem(hst["image"].to(fmap.dtype)) if s == 0 else side.downsamples[s - 1](y)
    y = side.stages[s].step(j, y, meta, fmap)
    done = j == len(side.groups[s]) - 1
    # a new dict and list, never changed in place: a checkpointed block's snapshot of the state stays exact
    state.extra["hst"] = {**hst, "x": y, "features": hst.get("features", []) + ([y] if done else [])}
    return x


def _features(state: TokenState) -> list[torch.Tensor]:
    found = state.extra.get("hst", {}).get("features")
    if not found or len(found) != 4:
        raise ValueError("hst: no side features for this batch; call model(x) or model.forward_features(x) first")
    return found


def _forward_head(model: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """The classification read-out on the last side stage: mean, BatchNorm1d(affine=False), head. `x` must be
    the tensor the latest `forward_features` returned (its side features are read; a ValueError otherwise)."""
    state = check_output(model, x, "hst")
    pooled = model.hst.norm(_features(state)[-1].mean((2, 3)))  # (B, dims[-1])
    return pooled if pre_logits else model.head(model.head_drop(pooled))


def forward_dense(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The side network's four feature maps for images `x`: `[(B, dims[s], H/4/2^s, W/4/2^s)]` (sizes rounded
    up), for a segmentation or detection head."""
    if not hasattr(model, "hst"):
        raise ValueError("hst: apply it first: vk.adapt(model, 'hst')")
    return list(_features(check_output(model, model.forward_features(x), "hst")))


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if hasattr(model, "hst"):
        raise ValueError("hst: already applied to this model")
    if len(model.blocks) < 4:
        raise NotImplementedError(f"hst: needs at least 4 blocks (one per side stage), the model has "
                                  f"{len(model.blocks)}")
    merging = [e.owner for e in runner.extensions["after_attn"]]
    if merging:
        raise NotImplementedError(f"hst: {', '.join(merging)} changes the token sequence; the side network reads "
                                  "the full patch grid of every layer")
    keep = earlier_trainable(model)
    ref = first_weight(model.patch_embed)
    with new_modules_follow_mode(model):
        model.hst = like(SideNetwork(model.embed_dim, len(model.blocks), model.patch_embed.proj.in_channels,
                                     cfg.dims, cfg.heads, cfg.mlp_ratio), ref)
        if model.num_classes > 0:
            model.head = like(nn.Linear(cfg.dims[-1], model.num_classes), ref)
    model.num_features = model.head_hidden_size = cfg.dims[-1]
    model.patch_embed.register_forward_pre_hook(_Bound(_capture_image, model))
    model.forward_head = _Bound(_forward_head, model)
    runner.add("before_block", _before_block, owner="hst")
    runner.add("after_block", _after_block, owner="hst")
    trained = {n for n, _ in model.named_parameters() if n.startswith("hst.")}
    if cfg.train_norms:
        trained |= {f"{m}.{n}" for m, mod in model.named_modules() if m and is_norm(mod) and not m.startswith("hst.")
                    for n, _ in mod.named_parameters(recurse=False)}
    freeze_except(model, keep | trained, train_head=cfg.train_head)
    return model


register("hst", kind="adapt", config=Config, apply=apply)
