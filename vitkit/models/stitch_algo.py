"""The algorithm of SN-Netv2 stitching, in plain torch (no timm): stitching layers and route sampling.

Pan et al., "Stitched ViTs are Flexible Vision Backbones" (SN-Netv2, 2023), from the spec
(`../shared/methods/applications.md` entry 2); the reference code is not used.

* A stitching layer maps the tokens leaving block i of one anchor to the tokens entering block j of the other.
  It starts as the least-squares solution on a calibration batch, min_W,b ||X W + b - Y||², and trains as a
  low-rank (LoRA-style) update of it: W_ls + down·up with `up` zero, so training starts exactly from W_ls.
* FLOPs-aware route sampling: routes crowd around some FLOPs values (many stitch points cost about the same).
  Sampling routes uniformly would train those regions more; SN-Netv2 bins the routes by FLOPs and samples a bin
  uniformly, then a route inside it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising ||x W + b - y||² over the rows of x (N, d_in) and y (N, d_out); W is (d_in, d_out)."""
    if x.shape[0] <= x.shape[1]:
        raise ValueError(f"stitch: the calibration batch gives {x.shape[0]} token rows for a {x.shape[1]}-wide "
                         f"least-squares fit; use more calibration images (rows must exceed the width)")
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    a = torch.cat([x.double(), ones], dim=1)
    solution = torch.linalg.lstsq(a.cpu(), y.double().cpu(), driver="gelsd").solution
    return solution[:-1].to(x.dtype), solution[-1].to(x.dtype)


class StitchLayer(nn.Module):
    """y = x (W_ls + down @ up) + b: a frozen least-squares map plus a trainable low-rank update (zero at init)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(in_dim, out_dim))  # set by `init_least_squares`
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.rank = rank
        if rank > 0:
            self.down = nn.Parameter(torch.randn(in_dim, rank) / in_dim ** 0.5)
            self.up = nn.Parameter(torch.zeros(rank, out_dim))

    def init_least_squares(self, x: torch.Tensor, y: torch.Tensor) -> None:
        weight, bias = least_squares(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
            if self.rank > 0:
                self.up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.down @ self.up if self.rank > 0 else self.weight
        return x @ weight + self.bias


def flops_bins(flops: Sequence[float], bins: int) -> list[list[int]]:
    """Route indices grouped into `bins` equal-width FLOPs intervals (empty intervals dropped)."""
    lo, hi = min(flops), max(flops)
    width = (hi - lo) / bins or 1.0
    groups: list[list[int]] = [[] for _ in range(bins)]
    for index, f in enumerate(flops):
        groups[min(int((f - lo) / width), bins - 1)].append(index)
    return [g for g in groups if g]


def sample_route(groups: list[list[int]], generator: Optional[torch.Generator] = None) -> int:
    """A bin uniformly, then a route uniformly inside it (FLOPs-aware sampling)."""
    group = groups[int(torch.randint(len(groups), (1,), generator=generator))]
    return group[int(torch.randint(len(group), (1,), generator=generator))]
