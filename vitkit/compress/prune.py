"""Essential Sparsity: one-shot magnitude pruning of a pretrained ViT, global or per layer, unstructured or N:M.

Paper: *The Emergence of Essential Sparsity in Large Pre-trained Models: The Weights that Matter*, Jaiswal et
al., NeurIPS 2023, arXiv:2306.03805.

Claim: about 30-50 % of a pretrained checkpoint's weights can be removed by magnitude in one shot with <= 1 point
drop; past that "knee" accuracy falls fast (also for N:M). `benchmarks/compress.py` draws the curve on the
shamail CIFAR-10 ViT, global against per layer.

Plugs in at: pattern 1 (the weight of a Linear), through `torch.nn.utils.parametrize`: each target weight is
multiplied by a bool mask (`_common.Mask`), so deepcopy, optimiser steps (masked weights get zero gradient),
`vk.fit` after pruning and `vk.save` (mask packed 1 bit per weight) keep working; `make_permanent(model)` bakes
the zeros into the weights and leaves plain timm layers (recorded, so `vk.load` rebuilds that state). Targets:
every block's `qkv`, `proj`, `fc1`, `fc2` (the fused qkv is one tensor for `scope='layer'`); `patch_embed` and
`head` only when listed. A model with LoRA layers has them merged first (a dense update added to a pruned
weight would destroy its sparsity; the trained update is kept, in the weight). Attention and SDPA untouched.

Hand-written here, and why: the unstructured masks are torch's own (`torch.nn.utils.prune.L1Unstructured`,
exact `round(s·n)` count), but torch's pruning re-parametrisation breaks `copy.deepcopy` and renames keys, so
the masks are held by `torch.nn.utils.parametrize`; the N:M mask is a per-group top-k (`prune_algo.nm_mask`),
because `torch.ao.pruning.WeightNormSparsifier` only computes one by re-parametrising the model itself (the
tests cross-check against it). Unstructured and N:M sparsity save no time in dense kernels: only 2:4 on CUDA
(sm80+, fp16/bf16) runs faster, through `to_semi_structured(model)` (torch's `to_sparse_semi_structured`).

Differs from the reference: the BERT code prunes q, k, v apart; here the fused qkv is one tensor, as the spec
says. No random / ERK baselines (the benchmark compares global with per-layer). Docs: docs/compress.md.
Spec: ../shared/methods/compress.md B1.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from vitkit.registry import register

from . import _common
from . import prune_algo as algo

_log = logging.getLogger("vitkit")
DEFAULT_SPARSITY = 0.5


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> (2, 4): keep 2 non-zeros in every 4 consecutive weights."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"prune: `pattern` must be 'N:M' (keep N of every M weights, e.g. '2:4'), got "
                         f"{pattern!r}") from None
    if not 1 <= n <= m:
        raise ValueError(f"prune: `pattern` {pattern!r} must keep 1 <= N <= M weights per group")
    return n, m


@dataclass(frozen=True)
class Config:
    sparsity: Optional[float] = field(default=None, metadata={
        "help": f"fraction of target weights set to zero, in [0, 1); unset: {DEFAULT_SPARSITY} (unstructured), "
                "or 1 - N/M with a `pattern`"})
    scope: Literal["global", "layer"] = field(default="global", metadata={
        "help": "global: one magnitude ranking over every target weight; layer: each weight tensor pruned to "
                "`sparsity` alone (N:M patterns are per group either way)"})
    pattern: Union[str, int] = field(default="", metadata={
        "help": "N:M: keep the N largest |w| of every M consecutive weights along the input dimension "
                "('2:4', '4:8'); empty: unstructured (YAML, hence the CLI and bench chains, reads an unquoted 2:4 "
                "as the base-60 number 124: such a number is read back as 2:4)"})
    targets: tuple[str, ...] = field(default=_common.DEFAULT_TARGETS, metadata={
        "help": "layers to prune: qkv, proj, fc1, fc2, mlp, attn, patch_embed, head, or regular expressions over "
                "module names"})
    permanent: bool = field(default=False, metadata={
        "help": "zeros baked into the weights, no masks (set by prune.make_permanent and recorded so that "
                "vk.save / vk.load rebuild that state)"})

    def __post_init__(self):
        if isinstance(self.pattern, int) and not isinstance(self.pattern, bool):  # YAML 1.1 sexagesimal: 2:4 -> 124
            object.__setattr__(self, "pattern", f"{self.pattern // 60}:{self.pattern % 60}")
        if self.sparsity is not None and not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ValueError(f"prune: `sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.pattern:
            n, m = parse_pattern(self.pattern)
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"prune: `pattern` {self.pattern} fixes the sparsity at {1 - n / m:g}; got "
                                 f"sparsity={self.sparsity}: give one or the other")
        if not self.targets:
            raise ValueError("prune: `targets` is empty; e.g. targets=('qkv', 'proj', 'fc1', 'fc2')")


def _masks(layers: list[tuple[str, nn.Module]], cfg: Config) -> list[torch.Tensor]:
    weights = [m.weight.detach() for _, m in layers]  # through a mask already there: its zeros rank first
    if cfg.pattern:
        n, m = parse_pattern(cfg.pattern)
        for (name, _), w in zip(layers, weights):
            width = w[0].numel()
            if width % m:
                raise ValueError(f"prune: pattern {cfg.pattern} needs the input width to be a multiple of M={m}; "
                                 f"{name} has width {width}")
        return [algo.nm_mask(w, n, m) for w in weights]
    sparsity = DEFAULT_SPARSITY if cfg.sparsity is None else cfg.sparsity
    return (algo.global_masks if cfg.scope == "global" else algo.layer_masks)(weights, sparsity)


def _merge_lora(model: nn.Module) -> None:
    if not any(hasattr(m, "lora_A") for m in model.modules()):  # (no PEFT import for a model without LoRA)
        return
    from vitkit.adapt import lora

    if lora.lora_layers(model):
        _log.info("prune: merging LoRA into the weights first (a dense update on a pruned weight would undo "
                  "the sparsity)")
        lora.merge(model)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from ._quant import quantised_layers

    quantised = quantised_layers(model)
    if quantised:
        raise ValueError(f"prune: {quantised[0][0]} is quantised already; prune the float model, then quantise "
                         "(vk.compress(model, 'prune', ...) before vk.compress(model, 'int8'))")
    _merge_lora(model)
    layers = _common.target_layers(model, cfg.targets, "prune")
    with torch.no_grad():
        for (_, module), mask in zip(layers, _masks(layers, cfg)):
            _common.add_mask(module, mask)
    if cfg.permanent:
        _common.make_permanent(model)
    stats = _common.sparsity_of(model, layers)
    _log.info("prune: %d of %d target weights are zero (%.2f %%) in %d layers", stats["zeros"], stats["total"],
              100 * stats["sparsity"], len(layers))
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights (plain timm layers again) and record it, so a save then load rebuilds
    the same state. Fine-tuning afterwards no longer keeps the zeros."""
    from vitkit.registry import Applied, applied

    _common.make_permanent(model)
    entries = applied(model)
    for i, entry in enumerate(entries):
        if entry.name == "prune":
            entries[i] = Applied("prune", dataclasses.replace(entry.config, permanent=True))
    return model


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Run 2:4-pruned Linears on torch's semi-structured sparse kernels (CUDA sm80+, fp16/bf16 weights):
    bakes the masks in and swaps each weight for `torch.sparse.to_sparse_semi_structured(weight)`. For
    inference; the result does not save with `vk.save`.

    Raises:
        NotImplementedError: on a device without those kernels (CPU, GPUs before sm80), naming it.
        ValueError: a layer is not exactly 2:4 or not fp16/bf16.
    """
    layers = _common.masked_layers(model)
    if not layers:
        raise ValueError("prune: no pruned layer; apply vk.compress(model, 'prune', pattern='2:4') first")
    device = layers[0][1].weight.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        raise NotImplementedError(f"prune: semi-structured 2:4 kernels need a CUDA GPU of compute capability 8.0 "
                                  f"or newer; the model is on {device} ({name}), where sparsity saves no time")
    for name, module in layers:
        w = module.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"prune: semi-structured kernels need fp16 or bf16 weights; {name} is {w.dtype}")
        if not bool((w.reshape(-1, 4) != 0).sum(1).le(2).all()):
            raise ValueError(f"prune: {name} is not 2:4 sparse; prune with pattern='2:4'")
    make_permanent(model)
    for _, module in layers:
        module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(module.weight.detach()),
                                     requires_grad=False)
    return model


register("prune", kind="compress", config=Config, apply=apply, identity={"sparsity": 0.0})
