"""`vk.info`: parameters (total, trainable, head), FLOPs from torch's flop counter, token layout, methods.

A model that is not a ViT (a timm ResNet or ConvNeXt loaded with `any_model=True`, any `nn.Module`) has no token
layout (`layout` None); its parameters and FLOPs are given at its `pretrained_cfg` input size or `input_size`.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which has no formula for the CPU fused-attention
kernel, so attention is switched to timm's eager path while counting (and restored), as bench.md §5 says.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from . import registry
from .adapt._common import head_parameter_names
from .models.layout import TokenLayout, token_layout


@dataclass
class Info:
    """What `vk.info` reports; `print(info)` gives a readable summary."""

    name: str
    total_params: int
    trainable_params: int
    head_params: int
    trainable_head_params: int
    gmacs: float
    input_size: tuple[int, int, int]
    layout: TokenLayout | None  # None: not a ViT (no tokens)
    methods: list[tuple[str, dict]] = field(default_factory=list)
    # token reduction at `input_size`: {"method": name, "r": merges per block after the caps (ToMe),
    # "tokens": sequence length after each block (prompts included), "observed": measured on one blank image
    # (ATS: image-dependent) rather than computed}; None without token reduction
    token_schedule: dict | None = None
    # blocks whose attention a method runs eagerly instead of fused SDPA: {method: [block, ...]} (tcpa)
    eager_attention: dict = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    def __str__(self) -> str:
        t = self.trainable_params
        lines = [
            f"model       {self.name}",
            f"params      {self.total_params:,} total | {t:,} trainable ({100 * self.trainable_fraction:.3f}%)"
            f" | {t - self.trainable_head_params:,} trainable without the head ({self.head_params:,} head)",
            f"compute     {self.gmacs:.3f} GMACs at {self.input_size[1]}x{self.input_size[2]}",
            f"tokens      {self.layout.num_tokens((self.input_size[1], self.input_size[2]))} "
            f"({self.layout.describe()})" if self.layout is not None else "tokens      - (not a ViT)",
        ]
        if self.methods:
            lines.append("methods     " + " -> ".join(f"{n}({', '.join(f'{k}={v}' for k, v in c.items())})"
                                                      for n, c in self.methods))
        else:
            lines.append("methods     none")
        if self.eager_attention:
            eager = "; ".join(f"eager in blocks {b} ({m})" for m, b in self.eager_attention.items())
            lines.append(f"attention   {eager}; fused SDPA elsewhere")
        ts = self.token_schedule
        if ts:
            how = "measured on one blank image" if ts.get("observed") else "after the 50% cap"
            merged = f"merges per block {ts['r']} -> " if ts.get("r") is not None else ""
            lines.append(f"schedule    {ts['method']}: {merged}tokens per block {ts['tokens']} ({how})")
        return "\n".join(lines)


TOKEN_METHODS = ("tome", "evit", "ats", "gtp")


@contextmanager
def token_schedule(model: nn.Module, input_size: tuple[int, int]):
    """Context manager yielding a dict that, after one forward of a blank image inside it (the FLOP count's),
    holds what the model's token reduction really does per block at `input_size` (H, W); see `Info`."""
    applied = [a for a in registry.applied(model) if a.name in TOKEN_METHODS]
    result: dict = {}
    if not applied:
        yield result
        return
    a = applied[-1]
    if a.name == "tome":  # deterministic: the capped schedule, no forward needed
        from .tokens import tome

        sched = tome.effective_schedule(model, a.config, input_size)
        result.update(method="tome", r=sched["r"], tokens=sched["tokens"], observed=False)
        yield result
        return
    from .models.runner import get_runner

    counts: list[int] = []
    runner = get_runner(model)
    runner.add("after_block", _CountTokens(counts), owner="vitkit.info")
    try:
        yield result
    finally:
        runner.remove("vitkit.info")
    result.update(method=a.name, r=None, tokens=counts[:len(model.blocks)], observed=True)


class _CountTokens:
    def __init__(self, counts: list):
        self.counts = counts

    def __call__(self, x, ctx):
        sizes = ctx.state.sizes  # real tokens only (ATS pads the batch with size-0 slots)
        self.counts.append(int((sizes[0, :, 0] > 0).sum()) if sizes is not None else x.shape[1])
        return None


@contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode, no grad and every parameter frozen (`vitkit.robust.frozen`: each module's mode and each flag
    restored afterwards). torch's module trackers (the flop counter's, MemTracker's) fail on trainable parameters
    under no_grad (e.g. prompt views, adapter weights)."""
    from vitkit.robust.api import frozen

    with frozen(model), torch.no_grad():
        yield model


def count_gmacs(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> float:
    """Multiply-accumulates (1e9) of one forward, with attention counted on timm's eager path."""
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        example = getattr(getattr(model, "patch_embed", None), "example_input", None)  # input adapters: clips, points
        x = example(batch) if example is not None else torch.zeros(batch, *input_size,
                                                                   device=next(model.parameters()).device)
        with frozen_eval(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, s in zip(attns, saved):
            m.fused_attn = s
    return counter.get_total_flops() / 2 / 1e9 / batch


def info(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> Info:
    """Summarise a model (see `Info`). `input_size` is (H, W) pixels; the model's own size when None."""
    layout = token_layout(model) if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") else None
    size = None if input_size is None else (
        (input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    if layout is not None:
        (h, w), in_chans = size or layout.img_size, layout.in_chans
        layout.grid((h, w))  # clear error for a size the model cannot take
    else:
        in_chans, h, w = _plain_input_size(model, size)
    head_names = head_parameter_names(model) or classifier_names(model)
    params = list(model.named_parameters())
    with token_schedule(model, (h, w)) as schedule:
        gmacs = count_gmacs(model, (in_chans, h, w))  # one forward of a blank image; also fills `schedule`
    base = model.__dict__.get("_vitkit_base", {})
    name = (base.get("name") or base.get("path") or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
            or ("vit" if layout is not None else type(model).__name__))
    return Info(
        name=str(name),
        total_params=sum(p.numel() for _, p in params),
        trainable_params=sum(p.numel() for _, p in params if p.requires_grad),
        head_params=sum(p.numel() for n, p in params if n in head_names),
        trainable_head_params=sum(p.numel() for n, p in params if n in head_names and p.requires_grad),
        gmacs=gmacs,
        input_size=(in_chans, h, w),
        layout=layout,
        methods=[(a.name, registry.config_dict(a.config)) for a in registry.applied(model)],
        token_schedule=schedule or None,
        eager_attention=eager_attention(model),
    )


def _plain_input_size(model: nn.Module, size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) for a model without a token layout: its `pretrained_cfg` input size, `size` replacing (H, W)."""
    cfg = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is None and not cfg:
        raise ValueError(f"vk.info: {type(model).__name__} is not a ViT and states no input size (no "
                         "`pretrained_cfg`); pass input_size=(H, W) (CLI: --input-size)")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = cfg[0] if cfg else getattr(conv, "in_channels", None)
    if chans is None:
        raise ValueError(f"vk.info: {type(model).__name__} is not a ViT and has no `pretrained_cfg` or convolution "
                         "that tells its input channels; count its FLOPs with torch's FlopCounterMode instead")
    return (int(chans), *(size or cfg[1:]))


def classifier_names(model: nn.Module) -> set[str]:
    """Parameter names of a timm model's classifier (`get_classifier()`: `fc` of a ResNet, `head.fc` of a
    ConvNeXt); empty for other modules."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefix = next((n for n, m in model.named_modules() if m is classifier and n), None)
    return set() if prefix is None else {f"{prefix}.{n}" for n, _ in classifier.named_parameters()}


def eager_attention(model: nn.Module) -> dict:
    """{method: blocks} for attentions whose `forward` a method replaced on the instance (marked with `owner`)."""
    out: dict = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        owner = getattr(getattr(block, "attn", None), "__dict__", {}).get("forward")
        if getattr(owner, "owner", None):
            out.setdefault(owner.owner, []).append(i)
    return out
