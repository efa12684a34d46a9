"""ExPLoRA: unfreeze one or two blocks and every norm, LoRA elsewhere, continue self-supervised pre-training on
the target domain, then fine-tune with a fresh LoRA (or a linear probe).

Paper: *ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under Domain Shifts*,
Khanna et al., 2024, arXiv:2406.10973.

Claim: continuing the backbone's own self-supervised objective on unlabelled target-domain images, with only the
last block(s) and all norms unfrozen and LoRA on the other blocks, adapts a ViT to a shifted domain (satellite
imagery) better than full pre-training + fine-tuning, with < 10% of the parameters (up to +8% linear-probe top-1).

Plugs in at: `requires_grad` (the chosen blocks, every LayerNorm / RmsNorm: `norm_pre`, `norm1`, `norm2`, qk-norms,
`norm`, `fc_norm`) + pattern 1: vitkit's q/v `QKVLoRA` (`vitkit.adapt.lora`) on the other blocks. Prefix tokens,
position embedding, patch embedding and LayerScale outside the chosen blocks stay frozen. At initialisation the
model computes exactly the pretrained function (B = 0). The recipe (`recipe`, `vitkit explora`):
1. `vk.adapt(model, "explora", ...)`, then `vk.pretrain(model, unlabelled, objective)` (the objective registry of
   `vitkit.pretrain`: `mae`, `dino`, ...; `vk.pretrain` keeps this trainable set and freezes the head);
2. `merge(model)`: the LoRA updates fold into the qkv weights, leaving a plain timm ViT with the adapted blocks;
3. `vk.adapt(model, "lora")` (fresh factors) or `"linear"`, then `vk.fit` on the labelled data.

Hand-written here, and why: ExPLoRA released no code and no library combines partial unfreezing with LoRA and a
self-supervised objective; the pieces are vitkit's own (`lora.QKVLoRA`, `vk.pretrain`, `vk.fit`).
Differs from the paper: the paper continues DINOv2's or MAE's own pre-training recipe; here any registered
objective runs, at its vitkit defaults. Block choice and rank are the paper's text only (no released code to
cross-check). Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P11.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch.nn as nn

from vitkit.registry import register

from ._common import earlier_trainable, forget, freeze_except, new_modules_follow_mode
from .lora import QKVLoRA, lora_layers

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    unfreeze_blocks: tuple[int, ...] = field(default=(-1,), metadata={
        "help": "blocks trained in full (negative: from the end; paper: the last block, sometimes the last two)"})
    rank: int = field(default=64, metadata={"help": "rank of the q/v LoRA on every other block (paper's DINOv2 "
                                                    "setting: 64)"})
    alpha: Optional[float] = field(default=None, metadata={"help": "LoRA scale numerator (update × alpha/rank); "
                                                                   "None: = rank, scale 1"})
    unfreeze_norms: bool = field(default=True, metadata={"help": "train every LayerNorm / RmsNorm of the ViT"})
    train_head: bool = field(default=True, metadata={
        "help": "train the classification head when this model is fine-tuned as it is (vk.pretrain never "
                "trains it)"})
    lr: float = field(default=1e-3, metadata={"help": "vk.fit's learning rate unless one is given; from LoRA's "
                                                     "VTAB-1k recipe (the paper fine-tunes with LoRA; vk.pretrain "
                                                     "uses its objective's lr and backbone_lr instead)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "vk.fit's AdamW weight decay unless one is given; "
                                                                "from the same recipe"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"explora: `rank` must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"explora: `alpha` must be > 0 (or None), got {self.alpha}")
        if len(set(self.unfreeze_blocks)) != len(self.unfreeze_blocks):
            raise ValueError(f"explora: `unfreeze_blocks` {self.unfreeze_blocks} repeats a block")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__ in ("RmsNorm", "SimpleNorm")


def unfrozen_blocks(model: nn.Module, cfg: Config) -> list[int]:
    """`cfg.unfreeze_blocks` as indices in [0, depth), checked."""
    depth = len(model.blocks)
    bad = [i for i in cfg.unfreeze_blocks if not -depth <= i < depth]
    if bad:
        raise ValueError(f"explora: `unfreeze_blocks` {bad} out of range for a model with {depth} blocks "
                         f"(0..{depth - 1}, or -1..-{depth})")
    return sorted({i % depth for i in cfg.unfreeze_blocks})


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"explora: needs a timm VisionTransformer, got {type(model).__name__}")
    if lora_layers(model):
        raise ValueError("explora: the model already has LoRA layers; merge them first (vitkit.adapt.lora.merge or "
                         "vitkit.adapt.explora.merge)")
    full = unfrozen_blocks(model, cfg)
    wrapped = [i for i, b in enumerate(model.blocks) if i not in full and type(b.attn.qkv) is not nn.Linear]
    if wrapped:
        raise ValueError(f"explora: blocks.{wrapped[0]}.attn.qkv is not a Linear (another method wraps it); "
                         "apply explora first")
    keep = earlier_trainable(model)
    with new_modules_follow_mode(model):
        for i, block in enumerate(model.blocks):
            if i not in full:
                block.attn.qkv = QKVLoRA(block.attn.qkv, ("q", "v"), cfg.rank,
                                         cfg.rank if cfg.alpha is None else cfg.alpha, 0.0)
    trained = {n for n, _ in model.named_parameters() if ".lora_" in n}
    trained |= {f"blocks.{i}.{n}" for i in full for n, _ in model.blocks[i].named_parameters()}
    if cfg.unfreeze_norms:
        trained |= {f"{m}.{n}" if m else n for m, mod in model.named_modules() if is_norm(mod)
                    for n, _ in mod.named_parameters(recurse=False)}
    freeze_except(model, keep | trained, train_head=cfg.train_head)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the LoRA updates into the qkv weights (float32, all or nothing) and unwrap them: a plain timm ViT
    holding the adapted blocks and norms (the `explora` entry leaves the model's method list)."""
    from vitkit.registry import applied

    from .lora import merge as lora_merge

    if "explora" not in [a.name for a in applied(model)]:
        raise ValueError("explora: not applied to this model; nothing to merge")
    lora_merge(model, unload=True)
    forget(model, "explora")
    return model


def recipe(model: nn.Module, unlabelled, train, val=None, *, objective: str = "mae", pretrain_epochs: int = 10,
           epochs: int = 10, finetune: str = "lora", finetune_config: Optional[dict] = None,
           pretrain_config: Optional[dict] = None, batch_size: int = 64, seed: int = 0,
           out_dir: str | Path = "runs/explora", progress: bool = True,
           on_phase_end: Optional[Callable[[str, nn.Module], None]] = None, **config) -> dict:
    """ExPLoRA's two phases on `model`, in place.

    Args:
        model: a timm ViT, `explora` not yet applied (it is applied here with `config`).
        unlabelled: target-domain images for phase 1 (a vitkit dataset, an image folder or `digits`; labels
            ignored); `vk.pretrain` attaches the objective's own transform.
        train, val: labelled datasets for phase 2, as `vk.fit` takes them (transform attached).
        objective: a `vitkit.pretrain` objective (`mae`, `dino`, ...); `pretrain_config`: its Config fields.
        pretrain_epochs, epochs: budgets of phase 1 and phase 2.
        finetune: `lora` (fresh q/v factors + head, the paper's default) or `linear` (head only);
            `finetune_config`: that method's Config fields.
        on_phase_end: called as `(phase, model)` after phase 1 (before the merge: "pretrain") and after phase 2
            ("finetune").

    Returns:
        `{"pretrain": per-epoch metrics of phase 1, "finetune": vk.fit's FitResult}`.
    """
    import vitkit as vk

    if finetune not in ("lora", "linear"):
        raise ValueError(f"explora: `finetune` must be 'lora' or 'linear', got {finetune!r}")
    out = Path(out_dir)
    vk.adapt(model, "explora", **config)
    vk.pretrain(model, unlabelled, objective, epochs=pretrain_epochs, batch_size=batch_size, seed=seed,
                out_dir=out / "pretrain", progress=progress, **(pretrain_config or {}))
    history = model.__dict__["_vitkit_pretrain"]["history"]
    if on_phase_end is not None:
        on_phase_end("pretrain", model)
    merge(model)
    _log.info("explora: phase 1 done (%s, %d epochs), LoRA merged; phase 2: %s", objective, pretrain_epochs,
              finetune)
    vk.adapt(model, finetune, **(finetune_config or {}))
    result = vk.fit(model, train, val, epochs=epochs, batch_size=batch_size, seed=seed, out_dir=out / "finetune",
                    progress=progress)
    if on_phase_end is not None:
        on_phase_end("finetune", model)
    return {"pretrain": history, "finetune": result}


register("explora", kind="adapt", config=Config, apply=apply, identity={})
