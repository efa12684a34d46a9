"""Prompt-CAM maps: the target class prompt's last-layer attention, per head, with heads ranked by blurring.

Paper: *Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis*, Chowdhury et al.,
CVPR 2025 (adaptation side: vitkit/adapt/prompt_cam.py). Spec: ../shared/methods/explain.md E3.

*Algorithm.* One forward (fused attention kept) caches the last block's input tokens `x` (after its
`before_block` prompts) and token state. The last block is then recomputed eagerly for the class-prompt query
rows only (MLP and residuals are per token, so the prompt outputs need no other row): trait maps are
`A_L[:, h, P + c, patches]` per head on the patch grid. *Blurring* heads S sets the pre-softmax logits of row
`P + c` to 0 in S, so the prompt's attention there is uniform (1/N over every key), not removed. Greedy
ranking: from S = ∅, add the head whose blurring keeps the target probability highest, until every head is
blurred; the reverse order ranks the heads by importance. Each step tries every head not yet blurred on the
whole batch (h² last-block passes over the C prompt rows; the paper counts h(h+1)/2 per image).

*Hand-written here, and why:* no library reads class-prompt attention; the eager recomputation calls the
block's own `norm1`, `attn.qkv`, `q_norm`, `k_norm`, `attn.norm`, `attn.proj`, `ls1/ls2`, `norm2`, `mlp`.
The maps refuse, naming the reason, a model whose last block has other extensions that change its prompt
outputs (a parallel MLP branch, a token edit after attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from vitkit.adapt.prompt_cam import NAME, class_logits
from vitkit.models.layout import token_layout
from vitkit.models.runner import get_runner, has_runner

from .attention import LayerAttention


@dataclass
class Cache:
    """The last block's input and what its token state said about it."""

    x: torch.Tensor  # (B, N, D) last block input after its before_block prompts
    start: int  # index of class prompt 0
    classes: int
    layer: LayerAttention  # the layout / grid / source bookkeeping (its `attn` is filled by `maps`)
    mask: Optional[torch.Tensor]


def check_model(model: nn.Module) -> None:
    """Refuse, with the reason, a model that is not a Prompt-CAM model or whose last block cannot be recomputed."""
    if not has_runner(model) or NAME not in get_runner(model).owners():
        raise ValueError("explain: method 'prompt-cam' needs a Prompt-CAM model: vk.adapt(model, 'prompt-cam') "
                         "and train it (its maps are the class prompts' attention)")
    runner, last = get_runner(model), len(model.blocks) - 1
    others = sorted({f"{e.owner} ({point})" for point in ("after_attn", "mlp_parallel") for e in
                     runner.extensions[point] if e.blocks is None or last in e.blocks})
    if others:
        raise NotImplementedError(f"explain: 'prompt-cam' recomputes the last block for the class prompts, and "
                                  f"{', '.join(others)} changes that block; explain a model without it")


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """Forward `x`; return the logits and the cache of the last block's input."""
    block, seen = model.blocks[-1], {}

    def on_norm1(module, args):
        state = get_runner(model).state
        seen.update(x=args[0], start=state.extra[NAME], grid=tuple(state.grid), prompts=state.num_prompts,
                    source=state.source, sizes=state.sizes)

    def on_attn(module, args, kwargs):
        seen["mask"] = kwargs.get("attn_mask")

    handles = [block.norm1.register_forward_pre_hook(on_norm1),
               block.attn.register_forward_pre_hook(on_attn, with_kwargs=True)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    layer = LayerAttention(len(model.blocks) - 1, torch.empty(0), token_layout(model), seen["grid"],
                           seen["prompts"], seen["source"], seen["sizes"])
    return logits, Cache(seen["x"], seen["start"], model.prompt_cam.prompts.shape[1], layer, seen.get("mask"))


def last_block(model: nn.Module, cache: Cache, target: torch.Tensor, blur: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager last block for the class-prompt rows.

    Args:
        target: (B,) class per sample; its prompt row is the one `blur` edits.
        blur: (B, h) bool, heads whose target-row pre-softmax logits are set to 0; None blurs nothing.

    Returns:
        (logits (B, C), attention of the prompt rows (B, h, C, N)).
    """
    block, attn = model.blocks[-1], model.blocks[-1].attn
    x = cache.x
    B, N, _ = x.shape
    h, rows = attn.num_heads, slice(cache.start, cache.start + cache.classes)
    xn = block.norm1(x)
    q, k, v = attn.qkv(xn).reshape(B, N, 3, h, attn.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
    q, k = attn.q_norm(q[:, :, rows]), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, h, C, N)
    if cache.mask is not None:
        mask = cache.mask[..., rows, :]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if blur is not None:
        row = torch.zeros(B, 1, cache.classes, 1, dtype=torch.bool, device=x.device)
        row[torch.arange(B), 0, target] = True
        logits = logits.masked_fill(row & blur[:, :, None, None], 0.0)
    a = logits.softmax(-1)
    o = attn.norm((a @ v).transpose(1, 2).reshape(B, cache.classes, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(xn[:, rows]).sigmoid()
    y = x[:, rows] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(o))))
    y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    return class_logits(model, y), a


@torch.no_grad()
def rank_heads(model: nn.Module, cache: Cache, target: torch.Tensor) -> torch.Tensor:
    """(B, h) head indices, most important first: greedy blurring that keeps the target probability highest,
    reversed."""
    B, h = cache.x.shape[0], model.blocks[-1].attn.num_heads
    blurred = torch.zeros(B, h, dtype=torch.bool, device=cache.x.device)
    order, rows = [], torch.arange(B, device=cache.x.device)
    for _ in range(h):
        best = torch.full((B,), -1.0, device=cache.x.device)
        pick = torch.zeros(B, dtype=torch.long, device=cache.x.device)
        for j in range(h):
            trial = blurred.clone()
            trial[:, j] = True
            p = last_block(model, cache, target, trial)[0].softmax(-1)[rows, target].float()
            p = p.masked_fill(blurred[:, j], -1.0)  # already blurred: not a candidate
            better = p > best
            best, pick = torch.where(better, p, best), torch.where(better, j, pick)
        blurred[rows, pick] = True
        order.append(pick)
    return torch.stack(order[::-1], dim=1)


@torch.no_grad()
def maps(model: nn.Module, x: torch.Tensor, target=None) -> dict:
    """Per-head trait maps of the target class prompt, the head ranking and the logits.

    Returns: {"head_maps": (B, h, gh, gw), "ranking": (B, h), "target": list[int], "logits": (B, C)}.
    """
    check_model(model)
    logits, cache = run(model, x)
    ids = logits.argmax(-1).tolist() if target is None else (
        [int(target)] * x.shape[0] if isinstance(target, int) else [int(t) for t in target])
    t = torch.tensor(ids, device=x.device)
    _, a = last_block(model, cache, t)
    row = a[torch.arange(x.shape[0]), :, t]  # (B, h, N): the target prompt's attention per head
    return {"head_maps": cache.layer.to_grid(row), "ranking": rank_heads(model, cache, t), "target": ids,
            "logits": logits}
