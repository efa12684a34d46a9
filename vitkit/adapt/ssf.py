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
`weight' = gamma*weight, bias' = gamma*bias + beta`; after the patch conv, per output channel (without a
conv bias, as in `pre_norm=True` ViTs, beta goes into the patch part of `pos_embed`). All or nothing; the result
loads strictly into the same timm architecture, so another bias-free layer is refused unless `add_bias=True`.

Hand-written here, and why: PEFT has no SSF. Differs from the reference: `init="identity"` (gamma = 1,
beta = 0) is offered for an exact identity; the default `init="normal"` is the reference's N(1, 0.02) /
N(0, 0.02), near but not exactly identity. Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P5.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from vitkit.registry import register

from ._common import earlier_trainable, first_weight, forget, freeze_except, new_modules_follow_mode

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

    def __init__(self, base_layer: nn.Module, dim: int, channel_dim: int, cfg: Config,
                 ref: torch.Tensor | None = None):
        super().__init__()
        self.base_layer, self.channel_dim = base_layer, channel_dim
        ref = next(base_layer.parameters()) if ref is None else ref  # device and dtype of gamma, beta
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
    def merged(self, name: str = "", add_bias: bool = False) -> tuple[nn.Module, torch.Tensor | None]:
        """A merged copy of the wrapped layer (the wrapper and the layer are not changed), computed in float32.

        Returns `(layer, shift)`: `shift` is beta when the layer has no bias to take it and `add_bias` is False
        (the caller folds it elsewhere or refuses); else None.
        """
        layer = self.base_layer
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            kind = type(layer).__name__ + (" (PEFT)" if type(layer).__module__.startswith("peft") else "")
            raise NotImplementedError(f"ssf: cannot merge into a {kind} ({name}); merge the method "
                                      "applied before ssf first (e.g. vitkit.adapt.lora.merge)")
        if isinstance(layer, nn.LayerNorm) and not layer.elementwise_affine:
            raise NotImplementedError(f"ssf: cannot merge into {name}, a LayerNorm without elementwise_affine; "
                                      "keep ssf unmerged")
        g, b = self.ssf_scale.float(), self.ssf_shift.float()
        new, w = copy.deepcopy(layer), layer.weight
        new.weight.data = (w.float() * g.view((-1,) + (1,) * (w.ndim - 1))).to(w.dtype)
        if layer.bias is not None:
            new.bias.data = (layer.bias.float() * g + b).to(layer.bias.dtype)
            return new, None
        if not add_bias:
            return new, b
        new.bias = nn.Parameter(b.to(w.dtype), requires_grad=w.requires_grad)
        return new, None


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
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
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
    with new_modules_follow_mode(model):
        for name, module in sites(model):
            parent, _, child = name.rpartition(".")
            channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
            ref = next(module.parameters(), None)
            setattr(model.get_submodule(parent) if parent else model, child,
                    SSF(module, _width(module), channel_dim, cfg, ref=first_weight(model) if ref is None else ref))
    trained = {n for n, _ in model.named_parameters() if n.endswith((".ssf_scale", ".ssf_shift"))}
    freeze_except(model, keep | trained, cfg.train_head)
    return model


def merge(model: nn.Module, add_bias: bool = False) -> nn.Module:
    """Fold every SSF affine into the layer before it; leaves a plain timm `VisionTransformer` whose state dict
    loads strictly into the architecture it came from.

    All or nothing: every merged layer is computed on a copy first; the model changes only when all succeed.
    A bias-free patch conv (`pre_norm=True`, CLIP-style) passes its shift to the patch part of `pos_embed`
    (same outputs, same keys). Any other layer without a bias (`qkv_bias=False`) cannot take its shift
    without a new bias key: refused, unless `add_bias=True` adds one (the result then loads into the
    architecture with that bias, e.g. `qkv_bias=True`).
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SSF)]
    plans, pos_embed = [], None
    for name, module in found:  # compute everything before changing anything
        layer, shift = module.merged(name, add_bias)
        if shift is not None and name == "patch_embed.proj" and _pos_embed_takes_shift(model):
            start = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            pos_embed = model.pos_embed.detach().float().clone()
            pos_embed[:, start:] += shift
        elif shift is not None:
            raise NotImplementedError(
                f"ssf: cannot merge the shift after {name}, a {type(module.base_layer).__name__} without bias: the "
                f"merged model would need a `{name}.bias` its timm architecture lacks; keep ssf unmerged, or "
                "ssf.merge(model, add_bias=True) (the result then loads into the architecture with that bias, "
                "e.g. qkv_bias=True)")
        plans.append((name, layer))
    for name, layer in plans:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if pos_embed is not None:
        model.pos_embed.data = pos_embed.to(model.pos_embed.dtype)
    forget(model, "ssf")
    return model


def _pos_embed_takes_shift(model: nn.Module) -> bool:
    """Whether a constant shift of the patch-conv output can move into `pos_embed`: it is added to every patch
    token right after the patch embedding, with no norm in between (resampling keeps a constant constant)."""
    return isinstance(getattr(model, "pos_embed", None), nn.Parameter) and \
        isinstance(model.patch_embed.norm, nn.Identity)


register("ssf", kind="adapt", config=Config, apply=apply, identity={"init": "identity"})
