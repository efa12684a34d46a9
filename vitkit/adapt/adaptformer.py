"""AdaptFormer: a scaled bottleneck MLP in parallel with every frozen block MLP.

Paper: *AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition*, Chen et al., NeurIPS 2022,
arXiv:2205.13535.

Claim: with < 2% extra parameters (ViT-B, bottleneck 64: 12 x 99,136 + head) a parallel adapter matches or beats
full fine-tuning on video and image benchmarks, and is an exact identity at initialisation (zero up-projection).

Plugs in at: pattern 2, the block runner's `mlp_parallel` point. With `x1` the residual stream after attention,
`x2 = x1 + dp2(ls2(mlp(norm2(x1)))) + s·up(drop(relu(down(x1))))`: the adapter reads `x1`, **not** `norm2(x1)`,
and sits outside `ls2`/`dp2`. Each block holds its adapter as the submodule `adaptformer`, so it is in the
state dict and `vk.save` writes it. Trainable: adapters (+ the head).

Hand-written here, and why: PEFT has no parallel bottleneck adapter for timm blocks; the module is 20 lines.
Differs from the reference: the learnable-scale and sequential options are not offered. Docs: docs/adapt.md.
Spec: ../shared/methods/adapt.md P2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register

from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode


@dataclass(frozen=True)
class Config:
    bottleneck: int = field(default=64, metadata={"help": "bottleneck width d of down (D->d) and up (d->D)"})
    scale: float = field(default=0.1, metadata={"help": "fixed scale s of the adapter branch"})
    dropout: float = field(default=0.1, metadata={"help": "dropout between ReLU and the up-projection"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for AdaptFormer (AdamW, batch"
                " 64, 100 epochs; V-PETL Bench uses it too; shared/methods/bench.md §4); the paper's SGD lr 0.1 x "
                "batch/256 does not carry over to AdamW"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})

    def __post_init__(self):
        if self.bottleneck < 1:
            raise ValueError(f"adaptformer: `bottleneck` must be >= 1, got {self.bottleneck}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adaptformer: `dropout` must be in [0, 1), got {self.dropout}")


class Adapter(nn.Module):
    """`s·up(drop(relu(down(x))))`; `up` starts at zero, so the branch starts at exactly 0."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return self.scale * self.up(self.drop(self.act(self.down(x))))


def _branch(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    return ctx.block.adaptformer(x)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if "adaptformer" in runner.owners():
        raise ValueError("adaptformer: already applied to this model")
    keep = earlier_trainable(model)
    with new_modules_follow_mode(model):
        for block in model.blocks:  # on each block's device and dtype (bf16 / fp16 models included)
            block.adaptformer = like(Adapter(model.embed_dim, cfg.bottleneck, cfg.scale, cfg.dropout),
                                     first_weight(block))
    runner.add("mlp_parallel", _branch, owner="adaptformer")
    freeze_except(model, keep | {n for n, _ in model.named_parameters() if ".adaptformer." in n}, cfg.train_head)
    return model


register("adaptformer", kind="adapt", config=Config, apply=apply, identity={})
