"""Points: an image-pretrained ViT on 3-D point clouds, with positions from virtual 2-D projections and guided
local adapters.

Paper: *Any2Point: Empowering Any-modality Large Models for Efficient 3D Understanding* (Tang et al., ECCV 2024,
arXiv:2404.07989).

Claim implemented (Any2Point §3.2, 3D-to-any virtual projection): a point tokenizer replaces the patch embedding:
G centres by farthest-point sampling, the k nearest points of each, a mini-PointNet (shared MLP on each
neighbour's offset from its centre, max-pooled) per group -> one token per group. Each token centre is projected
onto V virtual image planes and takes the position embedding of the pretrained 2-D grid at that spot (bilinear),
averaged over the views: the frozen ViT sees 3-D positions through the 2-D positions it was trained with, with no
new position parameters. Tokens do not depend on the order of the input points (FPS starts at the point farthest
from the centroid; kNN and max-pooling are order-free). Only the tokenizer and the head train.

With `adapters=True` (Any2Point §3.3, any-to-3D guided adapters), each block also gets an adapter after its MLP
that aggregates every point token's k nearest tokens in 3-D, weighted by how close the tokens' *projected*
positions are in each view (cosine of their 2-D position embeddings, softmax at temperature τ), the views
ensembled with learned weights: `x_i += up(Σ_v w_v Σ_j a_v[i, j] gelu(down(x_j)))` (`points_algo.guided_aggregate`).
`up` starts at zero, so a fresh adapter is an exact identity; adapters, tokenizer and head train, the backbone
stays frozen. With `position="learned"` the one learned 3-D position embedding guides the aggregation instead.

Input: `(B, N, 3)` xyz, N >= `num_groups` and >= `group_size`; each cloud is centred and scaled into the unit ball.
Plugs in at: the whole patch embedding (`vitkit.models.inflate.install_embed`, a `PointTokens` module) and the
model's `_pos_embed`; the token grid is (G, 1). The adapters: the block runner's `after_block` point, one submodule
`points_adapter` per block; the neighbours and guidance weights are computed once per forward, when positions are
taken, and travel in the token state. Algorithm in `points_algo.py` (torch only). Hand-written here, and why:
point-cloud libraries (PyTorch3D, torch-points3d) are heavy, CUDA-bound or unmaintained, and none offers
Any2Point's adapters; FPS, kNN, a two-layer PointNet and the guided aggregation are 60 lines. Differs from the
reference: Any2Point projects with fixed view angles of its own; here V evenly spaced yaw views at 30° pitch. Its
adapter's exact layout is not in the paper's text: here each token is the centre of its own neighbourhood (no
separate pooling and propagation step), the guidance is the parameter-free cosine of the position embeddings and
the view ensemble one learned weight per view and block; adapters need one token per point group, so token
reduction (tome, ...) composes with `points` only without them. Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.inflate import check_ndim, grid_pos_embed, install_embed
from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register

from . import points_algo as algo
from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode


@dataclass(frozen=True)
class Config:
    INPUT: ClassVar[str] = "point clouds (B, N, 3)"  # bench: its procedural task only
    num_groups: int = field(default=64, metadata={"help": "tokens G: farthest-point-sampled centres (Point-MAE: 64)"})
    group_size: int = field(default=32, metadata={"help": "k nearest points per centre (Point-MAE: 32)"})
    views: int = field(default=6, metadata={"help": "virtual projection planes V averaged for positions "
                                                    "(Any2Point: 6)"})
    hidden: int = field(default=128, metadata={"help": "width of the mini-PointNet's shared MLP"})
    position: Literal["projection", "learned"] = field(default="projection", metadata={
        "help": "projection: the 2-D grid's position embedding at the centres' virtual projections (Any2Point); "
                "learned: an MLP on the 3-D centres (the baseline Any2Point compares with)"})
    adapters: bool = field(default=False, metadata={
        "help": "Any2Point's guided local adapters after every block's MLP (trained with the tokenizer); off by "
                "default so that `points` composes with token reduction, which they refuse"})
    adapter_width: int = field(default=16, metadata={"help": "bottleneck width r of each adapter (down D->r, up "
                                                             "r->D); not given in the paper"})
    adapter_k: int = field(default=16, metadata={"help": "neighbours per token in the adapters' aggregation (its k "
                                                         "nearest tokens in 3-D, itself included); <= num_groups"})
    adapter_tau: float = field(default=0.1, metadata={"help": "softmax temperature on the cosine similarity of "
                                                              "the neighbours' projected position embeddings"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's points "
                "task; not swept)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})

    def __post_init__(self):
        for name in ("num_groups", "group_size", "views", "hidden", "adapter_width", "adapter_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"points: `{name}` must be >= 1, got {getattr(self, name)}")
        if self.adapters and self.adapter_k > self.num_groups:
            raise ValueError(f"points: `adapter_k` ({self.adapter_k}) must be <= `num_groups` ({self.num_groups}) "
                             "with `adapters=True`: a token's neighbours are other tokens")
        if not self.adapter_tau > 0:
            raise ValueError(f"points: `adapter_tau` must be > 0, got {self.adapter_tau}")


class PointTokens(nn.Module):
    """Point clouds `(B, N, 3)` -> G group tokens `(B, G, D)` and their centres in the unit ball `(B, G, 3)`."""

    def __init__(self, cfg: Config, dim: int):
        super().__init__()
        self.num_groups, self.group_size, self.in_chans = cfg.num_groups, cfg.group_size, 3
        self.patch_size, self.grid_size, self.img_size = (1, 1), (cfg.num_groups, 1), (cfg.num_groups, 1)
        self.num_patches = cfg.num_groups
        self.mlp1 = nn.Sequential(nn.Linear(3, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.mlp2 = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, dim))
        self.register_buffer("rotations", algo.view_rotations(cfg.views), persistent=False)
        self.pos_mlp = nn.Sequential(nn.Linear(3, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, dim)) \
            if cfg.position == "learned" else None
        self.guide = (cfg.adapter_k, cfg.adapter_tau) if cfg.adapters else None

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        check_ndim(x, 3, "point clouds (B, N, 3)", "points")
        if x.shape[-1] != 3 or x.shape[1] < max(self.num_groups, self.group_size):
            need = max(self.num_groups, self.group_size)
            raise ValueError(f"points: expected point clouds (B, N, 3) with N >= {need} (num_groups, group_size), "
                             f"got {tuple(x.shape)}")
        return self.grid_size

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """1,024 random points per cloud (`vk.info` counts FLOPs on them)."""
        return torch.rand(batch, max(1024, self.num_groups, self.group_size), 3, generator=torch.Generator()
                          .manual_seed(0)).to(self.mlp1[0].weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.token_grid(x)
        xyz, _, _ = algo.normalise(x)
        centres = algo.gather(xyz, algo.farthest_point_sample(xyz, self.num_groups))  # (B, G, 3)
        groups = algo.gather(xyz, algo.knn(xyz, centres, self.group_size)) - centres[:, :, None]  # (B, G, k, 3)
        f = self.mlp1(groups)  # mini-PointNet: per-point features, pooled, with the pooled feature concatenated
        f = torch.cat([f, f.amax(2, keepdim=True).expand_as(f)], -1)
        return self.mlp2(f).amax(2), centres  # (B, G, D)

    def position(self, out: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
        tokens, centres = out
        if self.pos_mlp is not None:
            pos = self.pos_mlp(centres)[:, None]  # (B, 1, G, D)
        else:
            uv = algo.project(centres, self.rotations)  # (B, V, G, 2)
            B, V, G, _ = uv.shape
            grid = grid_pos_embed(model).expand(B * V, -1, -1, -1)  # (B·V, D, gh, gw)
            pos = F.grid_sample(grid.to(tokens.dtype), uv.reshape(B * V, G, 1, 2).to(tokens.dtype), mode="bilinear",
                                padding_mode="border", align_corners=False)  # (B·V, D, G, 1)
            pos = pos.reshape(B, V, -1, G).transpose(2, 3)  # (B, V, G, D)
        if self.guide is not None:  # the adapters' neighbours and weights, for every block of this forward
            get_runner(model).state.extra["points"] = algo.guidance(centres, pos, *self.guide)
        return tokens + pos.mean(1)


class GuidedAdapter(nn.Module):
    """`up(Σ_v w_v Σ_j a_v[i, j] gelu(down(x_j)))` over each token's neighbours; `up` starts at zero."""

    def __init__(self, dim: int, width: int, views: int):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, dim)
        # softmax -> w_v, equal at init; one view (learned positions) needs no weight
        self.view_logits = nn.Parameter(torch.zeros(views)) if views > 1 else None
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # (B, G, D)
        h = self.act(self.down(x))
        w = h.new_ones(1) if self.view_logits is None else self.view_logits.softmax(0)
        return self.up(algo.guided_aggregate(h, idx, a, w))


def _after_block(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    guide = ctx.state.extra.get("points")
    p = ctx.state.num_prefix_tokens
    n = None if guide is None else guide[0].shape[1]
    if x.shape[1] - p != n:
        raise ValueError(f"points: the guided adapters need this forward's {n or 'G'} point tokens after the "
                         f"{p} prefix tokens, got {x.shape[1] - p}; token reduction (tome, evit, ats, gtp), patch "
                         "dropout and blocks called on their own do not compose with `adapters=True`")
    return torch.cat([x[:, :p], x[:, p:] + ctx.block.points_adapter(x[:, p:], *guide)], 1)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise NotImplementedError("points: needs a timm ViT patch embedding with a 2-D grid")
    keep = earlier_trainable(model)
    ref = next(model.parameters())
    install_embed(model, PointTokens(cfg, model.embed_dim).to(ref.device, ref.dtype), "points")
    train = {f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()}
    if cfg.adapters:
        views = cfg.views if cfg.position == "projection" else 1
        with new_modules_follow_mode(model):
            for block in model.blocks:
                block.points_adapter = like(GuidedAdapter(model.embed_dim, cfg.adapter_width, views),
                                            first_weight(block))
        get_runner(model).add("after_block", _after_block, owner="points")
        train |= {n for n, _ in model.named_parameters() if ".points_adapter." in n}
    freeze_except(model, keep | train, cfg.train_head)
    return model


register("points", kind="adapt", config=Config, apply=apply)
