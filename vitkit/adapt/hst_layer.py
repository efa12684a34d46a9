"""HST's side network in plain torch (no timm): a 4-stage convolutional-transformer pyramid fed by a frozen ViT.

Lin et al., *Hierarchical Side-Tuning for Vision Transformers*, 2023, arXiv:2310.05393. Written from the spec
(../shared/methods/adapt.md, P10), not from the reference code. Shapes: `B` batch, `D` ViT width, `d` stage width,
`(h, w)` the stage's grid, `(gh, gw)` the ViT's patch grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, d, h, w) map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stem(in_chans: int, dim: int) -> nn.Sequential:
    """conv3×3 s2 + BN + ReLU + conv2×2 s2: the image at 1/4 resolution, `dim` channels."""
    return nn.Sequential(nn.Conv2d(in_chans, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU(),
                         nn.Conv2d(dim, dim, 2, 2))


def downsample(dim_in: int, dim_out: int) -> nn.Sequential:
    """Overlapping conv3×3 s2 + LayerNorm: the next stage's grid, ceil(h/2) × ceil(w/2)."""
    return nn.Sequential(nn.Conv2d(dim_in, dim_out, 3, 2, 1), ChannelNorm(dim_out))


class CrossAttention(nn.Module):
    """Multi-head attention from the side tokens (queries) to a few context tokens (keys and values)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hst: stage width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:  # (B, n, d), (B, m, d) -> (B, n, d)
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, h, n, d/h)
        k, v = self.kv(ctx).reshape(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, m, d/h)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class SideBlock(nn.Module):
    """`x += attn(LN(x), ctx)`; `x += injected`; `x += mlp(LN(x))` on (B, h·w, d) tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), ctx)
        x = x + injected
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """One pyramid stage: `depth` side blocks, one per ViT layer it reads; the bridge `T: Linear(D -> d)` shared
    by the meta-register and the patches of those layers; one LayerNorm per layer on the bridged meta-register."""

    def __init__(self, vit_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.bridge = nn.Linear(vit_dim, dim)
        self.meta_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.blocks = nn.ModuleList(SideBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def step(self, j: int, x: torch.Tensor, meta: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        """Side block `j` on the (B, d, h, w) map `x`, reading the ViT layer's meta-register output `meta` (B, D)
        and patch map `fmap` (B, D, gh, gw); returns the new (B, d, h, w) map."""
        b, d, h, w = x.shape
        ctx = torch.stack([self.meta_norms[j](self.bridge(meta)),
                           self.bridge(fmap.flatten(2).transpose(1, 2)).mean(1)], dim=1)  # (B, 2, d)
        resized = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)  # (B, D, h, w)
        injected = self.bridge(resized.flatten(2).transpose(1, 2))  # (B, h·w, d)
        tokens = self.blocks[j](x.flatten(2).transpose(1, 2), ctx, injected)
        return tokens.transpose(1, 2).reshape(b, d, h, w)


class SideNetwork(nn.Module):
    """Meta-registers `meta (L, 1, D)` (Xavier), the stem, three downsamplings, four stages, and the
    `BatchNorm1d(affine=False)` of the classification read-out. `groups[s]`: the ViT layers stage `s` reads."""

    def __init__(self, vit_dim: int, depth: int, in_chans: int, dims: tuple[int, ...], heads: tuple[int, ...],
                 mlp_ratio: float):
        super().__init__()
        sizes = [len(g) for g in torch.arange(depth).tensor_split(len(dims))]  # contiguous, as even as possible
        self.groups = [list(range(sum(sizes[:s]), sum(sizes[:s + 1]))) for s in range(len(dims))]
        self.meta = nn.Parameter(torch.empty(depth, 1, vit_dim))
        for i in range(depth):
            nn.init.xavier_uniform_(self.meta[i])
        self.stem = stem(in_chans, dims[0])
        self.downsamples = nn.ModuleList(downsample(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.stages = nn.ModuleList(Stage(vit_dim, d, n, h, mlp_ratio) for d, n, h in zip(dims, sizes, heads))
        self.norm = nn.BatchNorm1d(dims[-1], affine=False)

    def where(self, layer: int) -> tuple[int, int]:
        """(stage, index inside the stage) of ViT layer `layer`."""
        for s, group in enumerate(self.groups):
            if layer in group:
                return s, group.index(layer)
        raise IndexError(layer)
