"""Shared plumbing of the compression methods: which layers a method compresses, and masks on their weights.

Targets (`target_layers`): friendly names `qkv`, `proj`, `fc1`, `fc2` (the block Linears, the spec's default
set), `mlp` (= fc1 + fc2), `attn` (= qkv + proj), `patch_embed` (the patch projection, a Conv2d), `head`
(the classifier), or regular expressions matched in full against module names. The patch embedding and the head
are compressed only when asked. A target that a method wrapped earlier (SSF, an unmerged LoRA) is refused,
naming the layer: compress the Linear itself (merge LoRA first, `vitkit.adapt.lora.merge`).

Masks (`Mask`, `add_mask`, `make_permanent`): a mask is a `torch.nn.utils.parametrize` parametrisation that
multiplies the weight by a bool buffer, so `copy.deepcopy`, optimiser steps (gradients of masked weights are
zero) and fine-tuning keep working; the state-dict keys become `<layer>.parametrizations.weight.original` and
`<layer>.parametrizations.weight.0.mask`. In a state dict the mask is packed 8 weights per byte (uint8), and
unpacked when loaded, so `vk.save` stores 1 bit per weight. `make_permanent` bakes the masks into the weights
(`remove_parametrizations(..., leave_parametrized=True)`).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
FRIENDLY = {  # friendly target -> (module-name pattern, module types)
    "qkv": (r"blocks\.\d+\.attn\.qkv", nn.Linear),
    "proj": (r"blocks\.\d+\.attn\.proj", nn.Linear),
    "fc1": (r"blocks\.\d+\.mlp\.fc1", nn.Linear),
    "fc2": (r"blocks\.\d+\.mlp\.fc2", nn.Linear),
    "mlp": (r"blocks\.\d+\.mlp\.fc[12]", nn.Linear),
    "attn": (r"blocks\.\d+\.attn\.(qkv|proj)", nn.Linear),
    "patch_embed": (r"patch_embed\.proj", nn.Conv2d),
    "head": (r"head|head_dist", nn.Linear),
}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def target_layers(model: nn.Module, targets: Iterable[str], method: str) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` of every layer `targets` names, in model order, each once.

    Args:
        targets: friendly names (module docstring) or regular expressions over module names (full match).
        method: the calling method's name, for error messages.

    Raises:
        ValueError: a target matches nothing, is not a valid pattern, or names a wrapped layer (SSF, LoRA, ...).
    """
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for target in targets:
        pattern, kinds = FRIENDLY.get(target, (target, (nn.Linear, nn.Conv2d)))
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{method}: target `{target}` is neither a friendly name ({', '.join(FRIENDLY)}) "
                             f"nor a valid regular expression ({err})") from None
        found = [n for n in modules if n and regex.fullmatch(n)]
        wrapped = [n for n in found if hasattr(modules[n], "base_layer") or hasattr(modules[n], "get_base_layer")]
        if wrapped:
            raise ValueError(f"{method}: {wrapped[0]} is a {type(modules[wrapped[0]]).__name__}, not a plain layer; "
                             f"apply {method} to merged weights (vitkit.adapt.lora.merge(model)) or before methods "
                             "that wrap Linears (e.g. ssf)")
        found = [n for n in found if isinstance(modules[n], kinds)]
        if not found:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"{method}: target `{target}` matches no layer it can compress; Linear layers are e.g. "
                             f"{', '.join(linears[:6])}")
        chosen.update((n, modules[n]) for n in found)
    return sorted(chosen.items(), key=lambda item: _natural(item[0]))


# ------------------------------------------------------------------------------------------------------ masks
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (little-endian bit order within a byte), flattened."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: the bool tensor of `shape`."""
    bits = (packed.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[: shape.numel()].reshape(shape).bool()


class Mask(nn.Module):
    """Parametrisation `w -> w * mask` with a bool `mask` buffer of the weight's shape (packed in state dicts)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self._register_state_dict_hook(_pack_hook)
        self._register_load_state_dict_pre_hook(_unpack_hook, with_module=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, sparsity={1 - self.mask.float().mean().item():.4f}"


def _pack_hook(module: Mask, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + "mask"] = pack_bits(state[prefix + "mask"])


def _unpack_hook(module: Mask, state: dict, prefix: str, *args) -> None:
    key = prefix + "mask"
    if key in state and state[key].dtype == torch.uint8:
        state[key] = unpack_bits(state[key], module.mask.shape)


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The mask on `module.weight` (None when it has none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    masks = [p.mask for p in module.parametrizations.weight if isinstance(p, Mask)]
    return masks[0] if masks else None


def add_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Hold `mask` on `module.weight`; a layer masked already keeps the intersection (zeros stay zero)."""
    if mask.shape != module.weight.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(module.weight.shape)}")
    old = mask_of(module)
    if old is not None:
        old.copy_(old & mask.to(old.device))
        return
    parametrize.register_parametrization(module, "weight", Mask(mask.to(module.weight.device)))


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every `(name, module)` of `model` with a mask on its weight."""
    return [(n, m) for n, m in model.named_modules() if mask_of(m) is not None]


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (zeros written into the tensor) and remove the parametrisations: the
    layers are plain timm layers again, and the state-dict keys are timm's own. Returns the same model."""
    for _, module in masked_layers(model):
        cls = type(module)  # possibly shared with deep copies: removal must not touch theirs
        module.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items()
                                                              if k not in ("__dict__", "__weakref__")})
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def sparsity_of(model: nn.Module, layers: Iterable[tuple[str, nn.Module]] | None = None) -> dict:
    """Zeros in the weights of `layers` (default: every masked layer): `{"zeros", "total", "sparsity"}`."""
    layers = masked_layers(model) if layers is None else list(layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return {"zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}
