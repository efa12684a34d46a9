"""A timm ViT forward written by hand in plain torch, from the block equation of ../shared/methods/adapt.md §0,
for the adapter oracles. Imports nothing from vitkit: the tests pass it the model's own tensors.

Covers what the oracle tests use: class token, registers, learned position embedding over prefix and patches,
pre-norm blocks `x <- x + attn(norm1(x))`, `x <- x + mlp(norm2(x))` (exact GELU), final norm, class-token pool,
linear head. Each adapter's test adds its method through one of three hooks.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict keyed by the base layer's names (wrappers keep the wrapped layer as `base_layer`)."""
    return {k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items()}


def vit_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, eps: float = 1e-6,
                site: Optional[Callable] = None, before_block: Optional[Callable] = None,
                mlp_parallel: Optional[Callable] = None, num_prompts: int = 0) -> torch.Tensor:
    """Logits of a timm ViT with tensors `sd` on images `x` (B, 3, H, W).

    site(name, input, output) -> output: after every Linear, LayerNorm and the patch conv, by module name.
    before_block(i, tokens, num_prefix) -> tokens: before block i.
    mlp_parallel(i, x1) -> term added to the block output beside the MLP branch (x1: after attention).
    num_prompts: tokens after the prefix removed before the final norm.
    """
    site = site or (lambda name, inp, out: out)
    lin = lambda n, t: site(n, t, F.linear(t, sd[f"{n}.weight"], sd.get(f"{n}.bias")))  # noqa: E731
    ln = lambda n, t: site(n, t, F.layer_norm(t, t.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], eps))  # noqa: E731
    w = sd["patch_embed.proj.weight"]
    t = site("patch_embed.proj", x, F.conv2d(x, w, sd.get("patch_embed.proj.bias"), stride=w.shape[-1]))
    t = t.flatten(2).transpose(1, 2)
    b = t.shape[0]
    prefix = [sd[k].expand(b, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    t = torch.cat(prefix + [t], dim=1) + sd["pos_embed"]
    p = t.shape[1] - (x.shape[-2] // w.shape[-2]) * (x.shape[-1] // w.shape[-1])
    for i in range(sum(1 for k in sd if k.endswith(".norm1.weight"))):
        blk = f"blocks.{i}."
        t = before_block(i, t, p) if before_block else t
        n, d = t.shape[1], t.shape[2]
        q, k, v = lin(blk + "attn.qkv", ln(blk + "norm1", t)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        t = t + lin(blk + "attn.proj", a.transpose(1, 2).reshape(b, n, d))
        mlp = lin(blk + "mlp.fc2", F.gelu(lin(blk + "mlp.fc1", ln(blk + "norm2", t))))
        t = t + mlp + (mlp_parallel(i, t) if mlp_parallel else 0)
    t = torch.cat([t[:, :p], t[:, p + num_prompts:]], dim=1)
    return F.linear(ln("norm", t)[:, 0], sd["head.weight"], sd["head.bias"])
