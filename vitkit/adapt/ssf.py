"""SSF, Scaling & Shifting Features: a learned per-channel affine after every operation, mergeable.

Paper: *Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning*, Lian et al., NeurIPS 2022,
arXiv:2210.08823.

Claim: `y <- gamma * y + beta` after each op of a frozen ViT (0.21 M parameters on ViT-B/16) beats full
fine-tuning on FGVC and VTAB-1k, and folds into the preceding layer, so inference costs nothing.

Plugs in at: pattern 1 (wrap a module's output; fused SDPA untouched). Sites: `patch_embed.proj` (and
`patch_embed.norm` if any); per block `norm1`, `attn.qkv` (3·attn_dim), `attn.proj`, `norm2`, `mlp.fc1` (H),
`mlp.fc2`; the final `norm` or `fc_norm` (whichever is a real norm). No site after `q_norm`. Each wrapper keeps
the wrapped layer as `base_layer`, so `vk.save` writes only gamma, beta (+ head). Counts: ViT-B 205,824.
`merge(model)`: after a Linear `W' = diag(gamma) W, b' = gamma*b + beta`; after a LayerNorm
`weight' = gamma*weight, bias' = gamma*bias + beta`; after the patch conv, per output channel.

Hand-written here, and why: PEFT has no SSF. Differs from the reference: `init="identity"` (gamma = 1,
beta = 0) is offered for an exact identity; the default `init="normal"` is the reference's N(1, 0.02) /
N(0, 0.02), near but not exactly identity. Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P5.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from vitkit.registry import register

from ._common import earlier_trainable, forget, freeze_except

BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class Config:
    init: Literal["normal", "identity"] = field(default="normal", metadata={
        "help": "normal: gamma ~ N(1, std), beta ~ N(0, std) as in the paper; identity: gamma = 1, beta = 0"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=1e-2, metadata={
        "help": "vk.fit's learning rate unless one is given; from the SSF paper's VTAB-1k scripts (AdamW, batch 32; "
                "shared/methods/adapt.md P5)"})
    weight_decay: float = field(default=5e-5, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same scripts"})


class SSF(nn.Module):
    """`gamma * base_layer(x) + beta` over the channel dimension (last, or 1 for a conv)."""

    def __init__(self, base_layer: nn.Module, dim: int, channel_dim: int, cfg: Config):
        super().__init__()
        self.base_layer, self.channel_dim = base_layer, channel_dim
        ref = next(base_layer.parameters())
        self.ssf_scale = nn.Parameter(torch.ones(dim, device=ref.device, dtype=ref.dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(dim, device=ref.device, dtype=ref.dtype))
        if cfg.init == "normal":
            nn.init.normal_(self.ssf_scale, 1.0, cfg.init_std)
            nn.init.normal_(self.ssf_shift, 0.0, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        shape = (-1,) + (1,) * (y.ndim - 1 - self.channel_dim) if self.channel_dim != -1 else (-1,)
        return y * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The wrapped layer with gamma and beta folded in (computed in float32)."""
        layer = self.base_layer
        if isinstance(layer, nn.LayerNorm) and not layer.elementwise_affine:
            raise NotImplementedError("ssf: cannot merge into a LayerNorm without elementwise_affine")
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            raise NotImplementedError(f"ssf: cannot merge into a {type(layer).__name__}; merge or remove the "
                                      "method applied before ssf first")
        g, b = self.ssf_scale.float(), self.ssf_shift.float()
        w = layer.weight
        w.copy_(w.float() * g.view((-1,) + (1,) * (w.ndim - 1)))
        bias = layer.bias.float() if layer.bias is not None else torch.zeros_like(g)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(w[:, 0] if w.ndim > 1 else w), requires_grad=False)
        layer.bias.copy_(bias * g + b)
        return layer


def sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer SSF follows."""
    found = [("patch_embed.proj", model.patch_embed.proj)]
    if not isinstance(model.patch_embed.norm, nn.Identity):
        found.append(("patch_embed.norm", model.patch_embed.norm))
    for i, block in enumerate(model.blocks):
        found += [(f"blocks.{i}.{s}", block.get_submodule(s)) for s in BLOCK_SITES]
    found += [(n, getattr(model, n)) for n in ("norm", "fc_norm") if not isinstance(getattr(model, n), nn.Identity)]
    return found


def _width(module: nn.Module) -> int:
    if hasattr(module, "base_layer"):  # a wrapper (LoRA): SSF follows its output, sized by the wrapped layer
        return _width(module.base_layer)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if getattr(module, "weight", None) is not None:
        return module.weight.shape[0]
    raise NotImplementedError(f"ssf: cannot size a {type(module).__name__} site")


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"ssf: needs a timm VisionTransformer, got {type(model).__name__}")
    if any(isinstance(m, SSF) for m in model.modules()):
        raise ValueError("ssf: already applied to this model")
    keep = earlier_trainable(model)
    for name, module in sites(model):
        parent, _, child = name.rpartition(".")
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
        setattr(model.get_submodule(parent) if parent else model, child, SSF(module, _width(module), channel_dim, cfg))
    trained = {n for n, _ in model.named_parameters() if n.endswith((".ssf_scale", ".ssf_shift"))}
    freeze_except(model, keep | trained, cfg.train_head)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every SSF affine into the layer before it; leaves a plain timm `VisionTransformer`."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SSF)]
    for name, module in found:  # check every site before changing any
        if not isinstance(module.base_layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            raise NotImplementedError(f"ssf: cannot merge into a {type(module.base_layer).__name__} ({name}); merge "
                                      "the method applied before ssf first (e.g. vitkit.adapt.lora.merge)")
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    forget(model, "ssf")
    return model


register("ssf", kind="adapt", config=Config, apply=apply, identity={"init": "identity"})
