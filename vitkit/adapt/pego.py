"""PEGO: a group of LoRAs on q and v, kept orthogonal to the pretrained weights and to each other.

Paper: *Learn to Preserve and Diversify: Parameter-Efficient Group with Orthogonal Regularization for Domain
Generalization*, Hu et al., ECCV 2024, arXiv:2407.15085.

Claim: K parallel low-rank updates of the q and v projections, regularised to be orthogonal to the pretrained
weights ("preserve") and to one another ("diversify"), generalise to unseen domains better than plain LoRA at no
test-time cost (state of the art on five DomainBed benchmarks; they merge away).

Plugs in at: pattern 1, a wrapper around every block's fused `attn.qkv` (`PEGOQKV`, keeping `base_layer`): q rows
`+= Σ_i B^q_i A^q_i x`, v rows likewise, k rows untouched; `A` Kaiming-uniform (a = √5), `B = 0`, no α/r
scaling, so a fresh group is an exact identity. The regulariser
`λ·Σ_blocks Σ_i [‖W_q ΔW^qᵢᵀ‖₁ + ‖W_v ΔW^vᵢᵀ‖₁ + Σ_{j>i}(‖ΔW^qᵢ ΔW^qⱼᵀ‖₁ + ‖ΔW^vᵢ ΔW^vⱼᵀ‖₁)]` reaches training
through `vk.fit`'s `add_loss` hook (registered by `apply`, and again by `vk.load`, which re-applies the method).
It and its gradient are exactly 0 at initialisation (B = 0): it acts only once the task loss has moved B.
Trainable: the factors (4·K·r·D per block) + the head. `merge(model)` folds the group into the qkv weights.

Hand-written here, and why: PEFT has no group of LoRAs with a cross-orthogonality loss, and its LoRA cannot
address the q and v slices of timm's fused qkv; the algorithm is `pego_algo.py` (plain torch).
Differs from the reference: the reference swaps CLIP's `nn.MultiheadAttention` for a qkv Linear; timm's ViTs are
already fused, so nothing is swapped. Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P12.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.registry import register

from . import pego_algo as algo
from ._common import earlier_trainable, forget, freeze_except, new_modules_follow_mode


@dataclass(frozen=True)
class Config:
    num_loras: int = field(default=4, metadata={
        "help": "K, LoRAs in the group (paper: 4 on VLCS, OfficeHome, TerraIncognita, DomainNet; 2 on PACS)"})
    rank: int = field(default=4, metadata={"help": "rank r of each LoRA (paper: 4)"})
    weight: float = field(default=1e-3, metadata={
        "help": "λ, weight of the orthogonality regulariser added to the task loss by vk.fit (paper: 1e-3; 0 "
                "turns the group into K plain LoRAs)"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=5e-4, metadata={"help": "vk.fit's learning rate unless one is given; from the paper "
                                                     "(Adam 5e-4 on DomainBed, CLIP ViT-B/16)"})
    weight_decay: float = field(default=0.0, metadata={"help": "vk.fit's weight decay unless one is given; from the "
                                                               "paper (0)"})

    def __post_init__(self):
        if self.num_loras < 1:
            raise ValueError(f"pego: `num_loras` must be >= 1, got {self.num_loras}")
        if self.rank < 1:
            raise ValueError(f"pego: `rank` must be >= 1, got {self.rank}")
        if not self.weight >= 0:
            raise ValueError(f"pego: `weight` must be >= 0, got {self.weight}")


class PEGOQKV(nn.Module):
    """A group of `K` rank-`r` updates on the q and v slices of a fused `[q; k; v]` Linear.

    `y = base_layer(x) + [Σ_i B^q_i A^q_i x; 0; Σ_i B^v_i A^v_i x]`; factors `lora_A_{q,v} (K, r, in)`,
    `lora_B_{q,v} (K, attn_dim, r)`.
    """

    def __init__(self, base_layer: nn.Linear, num_loras: int, rank: int):
        super().__init__()
        if base_layer.out_features % 3:
            raise ValueError(f"pego: a fused qkv Linear needs out_features divisible by 3, got "
                             f"{base_layer.out_features}")
        self.base_layer = base_layer
        self.attn_dim = base_layer.out_features // 3
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        for s in ("q", "v"):
            a = torch.empty(num_loras, rank, base_layer.in_features, **kw)
            for i in range(num_loras):  # per (r, in) matrix: fan_in = in, as nn.Linear would
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            setattr(self, f"lora_A_{s}", nn.Parameter(a))
            setattr(self, f"lora_B_{s}", nn.Parameter(torch.zeros(num_loras, self.attn_dim, rank, **kw)))

    def rows(self, s: str) -> torch.Tensor:
        """The frozen weight rows of slice `s` (q or v)."""
        start = {"q": 0, "v": 2 * self.attn_dim}[s]
        return self.base_layer.weight[start:start + self.attn_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dq = algo.group_apply(x, self.lora_A_q, self.lora_B_q)
        dv = algo.group_apply(x, self.lora_A_v, self.lora_B_v)
        return y + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def orthogonality(self) -> torch.Tensor:
        """This layer's share of the regulariser (unweighted)."""
        return sum(algo.orthogonality(self.rows(s).detach(), getattr(self, f"lora_A_{s}"),
                                      getattr(self, f"lora_B_{s}")) for s in ("q", "v"))

    def delta_weight(self) -> torch.Tensor:
        """The merged update (3·attn_dim, in) in float32; the k rows are exactly 0."""
        dq, dv = (algo.group_delta(getattr(self, f"lora_A_{s}").float(), getattr(self, f"lora_B_{s}").float())
                  for s in ("q", "v"))
        return torch.cat([dq, torch.zeros_like(dq), dv])

    def extra_repr(self) -> str:
        k, r, _ = self.lora_A_q.shape
        return f"num_loras={k}, rank={r}"


def layers(model: nn.Module) -> list[PEGOQKV]:
    return [m for m in model.modules() if isinstance(m, PEGOQKV)]


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """The regulariser summed over every block, unweighted (0-dim tensor)."""
    found = layers(model)
    if not found:
        raise ValueError("pego: the model has no PEGO layers; apply it first: vk.adapt(model, 'pego')")
    return sum(layer.orthogonality() for layer in found)


def _loss_term(model: nn.Module, images, logits, targets, *, weight: float) -> torch.Tensor:
    """The `add_loss` term: `λ·orthogonality_loss(model)` (`merge` removes it)."""
    return weight * orthogonality_loss(model).to(logits.dtype)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    from vitkit.train.fit import add_loss

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"pego: needs a timm VisionTransformer, got {type(model).__name__}")
    if layers(model):
        raise ValueError("pego: already applied to this model; merge it first (vitkit.adapt.pego.merge)")
    not_linear = [i for i, b in enumerate(model.blocks) if type(b.attn.qkv) is not nn.Linear]
    if not_linear:
        kind = type(model.blocks[not_linear[0]].attn.qkv).__name__
        raise ValueError(f"pego: blocks.{not_linear[0]}.attn.qkv is a {kind}, not a Linear (another method wraps "
                         "it); apply pego first")
    keep = earlier_trainable(model)
    with new_modules_follow_mode(model):
        for block in model.blocks:
            block.attn.qkv = PEGOQKV(block.attn.qkv, cfg.num_loras, cfg.rank)
    trained = {n for n, _ in model.named_parameters() if ".lora_A_" in n or ".lora_B_" in n}
    freeze_except(model, keep | trained, train_head=cfg.train_head)
    add_loss(model, functools.partial(_loss_term, weight=cfg.weight))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every group into its qkv weight (in float32) and unwrap it: a plain timm ViT again (the `pego`
    entry and its loss term leave the model). Refuses, changing nothing, if any update is not finite."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, PEGOQKV)]
    deltas = [m.delta_weight() for _, m in found]
    if not all(torch.isfinite(d).all() for d in deltas):
        raise ValueError("pego: merging would put NaN or inf into a qkv weight; the factors are not finite")
    for (name, m), delta in zip(found, deltas):
        w = m.base_layer.weight
        w.data = (w.data.float() + delta).to(w.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base_layer)
    losses = model.__dict__.get("_vitkit_losses", [])
    losses[:] = [f for f in losses if getattr(f, "func", None) is not _loss_term]
    forget(model, "pego")
    return model


register("pego", kind="adapt", config=Config, apply=apply, identity={})
