"""Points: an image-pretrained ViT on 3-D point clouds, with positions from virtual 2-D projections.

Paper: *Any2Point: Empowering Any-modality Large Models for Efficient 3D Understanding* (Tang et al., ECCV 2024,
arXiv:2404.07989).

Claim implemented (Any2Point §3.2, 3D-to-any virtual projection): a point tokenizer replaces the patch embedding:
G centres by farthest-point sampling, the k nearest points of each, a mini-PointNet (shared MLP on each
neighbour's offset from its centre, max-pooled) per group -> one token per group. Each token centre is projected
onto V virtual image planes and takes the position embedding of the pretrained 2-D grid at that spot (bilinear),
averaged over the views: the frozen ViT sees 3-D positions through the 2-D positions it was trained with, with no
new position parameters. Tokens do not depend on the order of the input points (FPS starts at the point farthest
from the centroid; kNN and max-pooling are order-free). Only the tokenizer and the head train (add LoRA / an
adapter for Any2Point's guided local adapters).

Input: `(B, N, 3)` xyz, N >= `num_groups` and >= `group_size`; each cloud is centred and scaled into the unit ball.
Plugs in at: the whole patch embedding (`vitkit.models.inflate.install_embed`, a `PointTokens` module) and the
model's `_pos_embed`; the token grid is (G, 1). Algorithm in `points_algo.py` (torch only). Hand-written here, and
why: point-cloud libraries (PyTorch3D, torch-points3d) are heavy, CUDA-bound or unmaintained; FPS, kNN and a
two-layer PointNet are 40 lines. Differs from the reference: Any2Point projects with fixed view angles of its own
and adds 1-D/2-D/3-D "guided" adapters inside the blocks; here V evenly spaced yaw views at 30° pitch and no
in-block adapters (compose with LoRA). Docs: docs/applications.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.inflate import check_ndim, grid_pos_embed, install_embed
from vitkit.registry import register

from . import points_algo as algo
from ._common import earlier_trainable, freeze_except


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
    train_head: bool = field(default=True, metadata={"help": "train the classification head"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; from benchmarks/applications.py's points "
                "task; not swept)"})
    weight_decay: float = field(default=0.05, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                          "from vk.fit's default, not swept for this adapter"})

    def __post_init__(self):
        for name in ("num_groups", "group_size", "views", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"points: `{name}` must be >= 1, got {getattr(self, name)}")


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
            return tokens + self.pos_mlp(centres)
        uv = algo.project(centres, self.rotations)  # (B, V, G, 2)
        B, V, G, _ = uv.shape
        grid = grid_pos_embed(model).expand(B * V, -1, -1, -1)  # (B·V, D, gh, gw)
        pos = F.grid_sample(grid.to(tokens.dtype), uv.reshape(B * V, G, 1, 2).to(tokens.dtype), mode="bilinear",
                            padding_mode="border", align_corners=False)  # (B·V, D, G, 1)
        return tokens + pos.reshape(B, V, -1, G).mean(1).transpose(1, 2)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise NotImplementedError("points: needs a timm ViT patch embedding with a 2-D grid")
    keep = earlier_trainable(model)
    ref = next(model.parameters())
    install_embed(model, PointTokens(cfg, model.embed_dim).to(ref.device, ref.dtype), "points")
    train = {f"patch_embed.{n}" for n, _ in model.patch_embed.named_parameters()}
    freeze_except(model, keep | train, cfg.train_head)
    return model


register("points", kind="adapt", config=Config, apply=apply)
