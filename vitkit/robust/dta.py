"""DTA, the downstream transfer attack: perturbations crafted on the public pretrained ViT fool models fine-tuned
from it, without access to them.

Paper: *Downstream Transfer Attack: Adversarial Attacks on Downstream Models with Pre-trained Vision
Transformers*, Zheng, Ma et al., 2024 (title to verify).

Claim: an attacker who holds only the pretrained weights crafts per-image perturbations that fool unknown
downstream models fine-tuned from them (full fine-tuning, linear probe, PEFT) by pushing one intermediate
layer's token features away from the clean ones; average ASR > 90% across pretraining methods, fine-tuning
schemes and datasets (benchmarks/dta.py measures it on the shamail CIFAR ViT).

Plugs in at: the input only. `vk.attack(source, images, method="dta", layer="auto" | int)` runs on the
*pretrained source* model (frozen, eval mode, restored afterwards, like every attack) and needs neither labels
nor the downstream model; `result.transfer(downstream, labels=y)` scores the same images on each downstream
model. Features come from the source's `forward_intermediates` (block `layer`'s output, all tokens: class token
and registers when the model has them, then patches; prompts of adapters never enter, they are stripped), in
the model's normalisation (pixel-space ε, `AttackContext.normalise`).

Algorithm (`dta_algo.py`): minimise `cos(vec g_l(x + δ), vec g_l(x))` over `δ = ε·tanh(w)`, `w ~ U(-1, 1)`, Adam
with lr 1 on `w` for 10 steps, ε = 10/255, `x + δ` clipped to [0, 1]. `layer="auto"` is vitkit's
reconstruction of the paper's unreleased rule: attack every block on the first `probe` images of the first
batch, keep the block whose examples most lower the cosine of the source's *final* pooled features (what a
downstream head reads); the choice and the per-layer curve are logged and kept for the whole call
(`choose_layer` returns them).

Hand-written here, and why: torchattacks and ART attack a classifier's loss; none offers a feature-level
attack on an intermediate layer of a pretrained encoder or the layer rule. Differs from the reference: the
related release's differentiable JPEG, augmentation and multi-encoder ensemble are not offered; the flattened
vector mixes prefix and patch tokens as the reference does (`tokens="patches"` leaves the prefix out).
Spec: ../shared/methods/robust.md R2. Docs: docs/robust.md.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.nn as nn

from . import dta_algo as algo
from .api import AttackContext, frozen, norm_stats, register_attack

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    eps: float = field(default=10 / 255, metadata={"help": "L∞ radius of the perturbation in pixel units of [0, 1]"
                                                           " images (the paper's 10/255)"})
    steps: int = field(default=10, metadata={"help": "Adam steps on the tanh parameters w"})
    lr: float = field(default=1.0, metadata={"help": "Adam learning rate on w (δ = ε·tanh(w))"})
    layer: Union[int, Literal["auto"]] = field(default="auto", metadata={
        "help": "source block whose output features are pushed away (0-based, negative counts from the end), or "
                "'auto': vitkit's reconstruction of the paper's rule (the block whose examples most lower the "
                "final-feature cosine on a probe set)"})
    probe: int = field(default=32, metadata={"help": "images of the first batch on which layer='auto' attacks "
                                                     "every block to choose one"})
    tokens: Literal["all", "patches"] = field(default="all", metadata={
        "help": "tokens in the cosine: 'all' (prefix + patches, flattened, the reference's choice) or 'patches'"})

    def __post_init__(self):
        if self.eps < 0:
            raise ValueError(f"dta: `eps` must be >= 0, got {self.eps} (ε is in pixel units of [0, 1] images, e.g. "
                             f"10/255 = {10 / 255:.5f})")
        if self.steps < 0:
            raise ValueError(f"dta: `steps` must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"dta: `lr` must be > 0, got {self.lr}")
        if self.probe < 1:
            raise ValueError(f"dta: `probe` must be >= 1, got {self.probe}")


def _depth(model: nn.Module) -> int:
    if not (hasattr(model, "forward_intermediates") and isinstance(getattr(model, "blocks", None), nn.Sequential)):
        raise NotImplementedError(f"dta: needs a timm ViT with `blocks` and `forward_intermediates` as the source "
                                  f"model, got {type(model).__name__}")
    return len(model.blocks)


def _index(model: nn.Module, layer: int) -> int:
    depth = _depth(model)
    if not -depth <= layer < depth:
        raise ValueError(f"dta: `layer` {layer} is out of range for a source with {depth} blocks; use 0..{depth - 1}, "
                         f"a negative index, or 'auto'")
    return layer % depth


def layer_features(ctx: AttackContext, layer: int, tokens: str = "all") -> algo.Features:
    """`g_l`: pixel images -> block `layer`'s output tokens (B, N, D) of the source (prefix first unless
    `tokens='patches'`; prompts stripped)."""
    def g(x: torch.Tensor) -> torch.Tensor:
        out = ctx.model.forward_intermediates(ctx.normalise(x), indices=[layer], return_prefix_tokens=True,
                                              output_fmt="NLC", intermediates_only=True, stop_early=True)[0]
        if isinstance(out, tuple):  # (patches, prefix) when the model has prefix tokens
            patches, prefix = out
            return patches if tokens == "patches" else torch.cat([prefix, patches], dim=1)
        return out
    return g


def final_features(ctx: AttackContext) -> algo.Features:
    """The source's pooled pre-logits features of pixel images (B, D): what a downstream head reads."""
    return lambda x: ctx.model.forward_head(ctx.model.forward_features(ctx.normalise(x)), pre_logits=True)


def _start(ctx: AttackContext, x: torch.Tensor) -> torch.Tensor:
    """w ~ U(-1, 1), drawn on the attack's CPU generator (the same on every device)."""
    return (torch.rand(x.shape, generator=ctx.generator) * 2 - 1).to(x.device, x.dtype)


def _choose(ctx: AttackContext, x: torch.Tensor, cfg: Config) -> tuple[int, list[float]]:
    depth = _depth(ctx.model)
    probe = x[:cfg.probe]
    layers = [layer_features(ctx, i, cfg.tokens) for i in range(depth)]
    return algo.choose_layer(layers, final_features(ctx), probe, _start(ctx, probe), eps=cfg.eps, steps=cfg.steps,
                             lr=cfg.lr)


def choose_layer(source: nn.Module, images: torch.Tensor, *, seed: int = 0, mean=None, std=None,
                 **config) -> tuple[int, list[float]]:
    """The block `layer='auto'` picks on the pixel `images` (the probe set, all of them are used), and the
    final-feature cosine after attacking each block (the per-layer curve; lower = a stronger layer).

    `config`: DTA's `Config` fields (`eps`, `steps`, `lr`, `tokens`). The source is frozen and restored.
    """
    from vitkit import registry

    from .api import _stat_tensor, check_images, get_attack

    cfg = registry.make_config(get_attack("dta"), **config)
    x = check_images(images, "dta")
    m, s = norm_stats(source, mean, std)
    dev = next(source.parameters()).device
    ctx = AttackContext(source, _stat_tensor(m, dev), _stat_tensor(s, dev),
                        generator=torch.Generator().manual_seed(seed))
    with frozen(source):
        return _choose(ctx, x.to(dev), dataclasses.replace(cfg, probe=x.shape[0]))


def run(ctx: AttackContext, x: torch.Tensor, y, cfg: Config) -> torch.Tensor:
    """DTA on one batch of pixel images (see `vitkit.robust.api.Attack.run`); labels are not used."""
    if ctx.targeted:
        raise ValueError("dta: the attack is untargeted (it pushes features away, towards no class); drop `targets`")
    if cfg.layer == "auto":
        if "dta_layer" not in vars(ctx):  # decided once per vk.attack call, on its first batch
            ctx.dta_layer, curve = _choose(ctx, x, cfg)
            _log.info("dta: layer='auto' chose block %d; final-feature cosine per block: %s", ctx.dta_layer,
                      ", ".join(f"{i}: {c:.3f}" for i, c in enumerate(curve)))
        layer = ctx.dta_layer
    else:
        layer = _index(ctx.model, cfg.layer)
    x_adv, _ = algo.craft(layer_features(ctx, layer, cfg.tokens), x, _start(ctx, x), eps=cfg.eps, steps=cfg.steps,
                          lr=cfg.lr)
    return x_adv


register_attack("dta", config=Config, run=run, needs_labels=False)
