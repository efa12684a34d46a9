"""Shared plumbing of the token-reduction integrations: attention taps, state checks, the log-size bias.

Taps are forward hooks on timm's own `Attention` sub-modules (`q_norm`, `k_norm`, `qkv`, `attn_drop`): they see
exactly what attention computes, at no extra cost, so no method re-implements `Attention.forward`.

A tap follows the module the attention calls *now*, not the one that was there when the method was applied:
adapters applied later wrap `attn.qkv` (LoRA's `QKVLoRA`, PEFT's LoRA / LoHa / LoKr layers, SSF) and a hook on
the wrapped Linear would read the unadapted output. A forward pre-hook on the (never replaced) `Attention`
moves each tap onto the current outermost module, and a tap left on an inner module stays silent; so a token
method may be applied before or after any adapter with the same result.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from vitkit.models.runner import BlockContext, TokenState, get_runner

TOKEN_METHODS = ("tome", "evit", "ats", "gtp")


class Tap:
    """Forward hook storing a module's output in the current token state under `key` (deep-copies with the
    model, since it holds the model, not a closure). With `attn` and `part` it fires only while the module is
    `attn.<part>` itself (not a layer that something wrapped since)."""

    def __init__(self, model: nn.Module, key: str, attn: Optional[nn.Module] = None, part: Optional[str] = None):
        self.model, self.key, self.attn, self.part = model, key, attn, part

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self.attn is not None and getattr(self.attn, self.part) is not module:
            return None  # wrapped since (e.g. LoRA's base_layer): the wrapper's output is what attention uses
        state = get_runner(self.model).state
        if state is not None:
            state.extra[self.key] = output
        return None


class Retap:
    """Forward pre-hook on `attn`: makes sure each tapped part that attention calls now carries its tap."""

    def __init__(self, model: nn.Module, parts: dict[str, str]):
        self.model, self.parts = model, dict(parts)

    def __call__(self, attn: nn.Module, args) -> None:
        for part, key in self.parts.items():
            target = getattr(attn, part)
            if not any(isinstance(h, Tap) and h.key == key and h.attn is attn
                       for h in target._forward_hooks.values()):
                target.register_forward_hook(Tap(self.model, key, attn, part))
        return None


def add_taps(model: nn.Module, blocks: Iterable[int], parts: dict[str, str]) -> None:
    """Tap `block.attn.<part>` of each block in `blocks`, whatever wraps that part later; its output lands in
    `state.extra[key]`."""
    for i in blocks:
        attn = model.blocks[i].attn
        retap = Retap(model, parts)
        attn.register_forward_pre_hook(retap)
        retap(attn, ())


def take_tap(ctx: BlockContext, key: str, method: str) -> torch.Tensor:
    """Pop this block's tapped tensor; a missing tap means attention did not run through timm's module."""
    try:
        return ctx.state.extra.pop(key)
    except KeyError:
        raise RuntimeError(f"{method}: block {ctx.index} produced no `{key}` tap; the attention module was "
                           "replaced or bypassed after the method was applied") from None


def block_indices(model: nn.Module, blocks: Optional[Sequence[int]], default: Callable[[int], Iterable[int]],
                  field: str, method: str) -> list[int]:
    """The blocks a method acts in: `blocks`, or `default(depth)` when None; sorted, each once, and refused (naming
    `method`'s config `field`) when out of range."""
    depth = len(model.blocks)
    chosen = sorted(set(default(depth) if blocks is None else blocks))
    bad = [b for b in chosen if not 0 <= b < depth]
    if bad:
        raise ValueError(f"{method}: `{field}` {bad} out of range for a model with {depth} blocks")
    return chosen


def require_class_token(model: nn.Module, method: str) -> None:
    """Refuse models without a class token: `method` scores tokens by class-token attention."""
    from vitkit.models.layout import token_layout

    if token_layout(model).cls_index is None:
        raise NotImplementedError(f"{method}: needs a class token (it scores tokens by class-token attention); "
                                  "this model has none: use `tome` instead")


def refuse_second(model: nn.Module, method: str) -> None:
    """Two token-reduction methods on one model would fight over the token state: refuse clearly."""
    others = [o for o in get_runner(model).owners() if o in TOKEN_METHODS]
    if others:
        raise ValueError(f"{method}: the model already has token reduction `{others[0]}`; apply one "
                         "token-reduction method per model (start again from vk.load)")


def check_state(x: torch.Tensor, state: TokenState, method: str, index: int) -> None:
    """A block seeing a token count that disagrees with the state's sizes raises (stale or foreign state)."""
    if state.sizes is not None and state.sizes.shape[:2] != x.shape[:2]:
        raise RuntimeError(f"{method}: block {index} got {tuple(x.shape[:2])} tokens but the token state holds "
                           f"sizes for {tuple(state.sizes.shape[:2])}; call the model (forward, forward_features "
                           "or forward_intermediates), not its blocks one by one, after token reduction")


def log_size_bias(x: torch.Tensor, state: TokenState) -> Optional[torch.Tensor]:
    """Proportional attention: additive `log s_j` mask (B, 1, 1, N) in the query dtype; None while sizes are 1.

    Zero sizes (padding) give -inf, so padded keys are excluded as well.
    """
    if state.sizes is None:
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return state.sizes[..., 0].log().to(dtype)[:, None, None, :]


def size_bias(x: torch.Tensor, ctx: BlockContext) -> Optional[torch.Tensor]:
    """`attn_bias` extension: the log-size mask of the current state."""
    return log_size_bias(x, ctx.state)
