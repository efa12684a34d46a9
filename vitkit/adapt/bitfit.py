"""BitFit: train only the biases (and the head) of a frozen ViT.

Paper: *BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models*, Ben Zaken
et al., ACL 2022, arXiv:2106.10199.

Claim: with small-to-medium data, bias-only tuning is competitive with full fine-tuning (ViT-B/16: 102,912
trainable biases with LayerNorm biases, 83,712 without, on timm 1.0.31).

Plugs in at: `requires_grad` only. Selected by module type: the `bias` of every `nn.Linear`, `nn.Conv2d` and
(with `norm_bias=True`) `nn.LayerNorm` in the backbone, plus the head. Counted from the model, so
`qkv_bias=False` models simply have fewer. Applying it leaves outputs unchanged.

Hand-written here, and why: nothing beyond `requires_grad`. Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P4.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from vitkit.registry import register

from ._common import base_name, earlier_trainable, freeze_except, head_parameter_names


@dataclass(frozen=True)
class Config:
    norm_bias: bool = field(default=True, metadata={"help": "train LayerNorm biases too"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for BitFit (AdamW, batch 64, "
                "100 epochs; V-PETL Bench uses it too; shared/methods/bench.md §4)"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe (biases are never decayed)"})


def bias_names(model: nn.Module, norm_bias: bool = True) -> set[str]:
    """Names of the biases BitFit trains (head excluded; base names, without `.base_layer.`)."""
    types = (nn.Linear, nn.Conv2d) + ((nn.LayerNorm,) if norm_bias else ())
    head = head_parameter_names(model)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, types) and getattr(module, "bias", None) is not None:
            full = base_name(f"{name}.bias")
            if full not in head:
                names.add(full)
    return names


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    freeze_except(model, earlier_trainable(model) | bias_names(model, cfg.norm_bias), cfg.train_head)
    return model


register("bitfit", kind="adapt", config=Config, apply=apply, identity={})
