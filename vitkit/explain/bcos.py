"""`vk.explain(model, image, method="bcos")`: exact contribution maps of a B-cosified ViT (spec: explain.md E4).

In explanation mode (`vitkit.adapt.bcosify.explanation_mode`) a B-cosified ViT is a linear function of its
sources: the encoded input x̃ = [z, −z] and the input-independent tensors added on the way (class token,
registers, position embeddings, and biases if `bcosify(bias=True)` kept them). So for the explained class c

    y_c = Σ_i x̃_i ∂y_c/∂x̃_i  +  Σ_t ⟨t, ∂y_c/∂t⟩  +  log(1/(C − 1))

exactly (floating point aside): the pixel map is the first sum over the 6 channels, `constant` the second,
`logit_bias` the third. Since x̃ = [z, −z], Σ over the 6 channels of x̃ ⊙ ∂y/∂x̃ equals z ⊙ ∂y/∂z summed over
the 3 channels of the normalised image z, which is how it is computed. One forward and backward per image.

Hand-written here: the map is a gradient × input of the detached network, a few lines of autograd; no library
knows B-cos ViTs. Docs: docs/explain.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.layout import token_layout
from vitkit.models.runner import no_checkpointing

from .maps import Explanation

CONSTANT_TOKENS = ("cls_token", "reg_token", "dist_token", "pos_embed")


@dataclass
class BcosExplanation(Explanation):
    """An `Explanation` (heatmap: the positive contributions divided by their 99.5th percentile and clipped at
    1, so that a few pixels do not take the whole colour scale; patch_map: the contributions summed over each
    patch) with the exact decomposition of the explained logit.

    Attributes:
        contributions: (B, H, W) signed contribution of every pixel, x̃ ⊙ ∂y_c/∂x̃ summed over the channels.
        constant: (B,) contribution of the input-independent tensors, Σ_t ⟨t, ∂y_c/∂t⟩.
        logit_bias: the head's constant log(1/(C − 1)) (0 without it).
        logit: (B,) the explained logit y_c = contributions.sum() + constant + logit_bias.
    """

    contributions: Optional[torch.Tensor] = None
    constant: Optional[torch.Tensor] = None
    logit_bias: float = 0.0
    logit: Optional[torch.Tensor] = None


def constant_sources(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters added to the computation independently of the input: prefix tokens, position embeddings,
    and every bias left (B-cosification removes them unless `bias=True`)."""
    return [(n, p) for n, p in model.named_parameters()
            if n in CONSTANT_TOKENS or n.rpartition(".")[2] == "bias"]


def bcos_explain(model: nn.Module, x: torch.Tensor, target=None, image=None) -> BcosExplanation:
    """Contribution maps of `model` (B-cosified, eval mode) for the normalised input `x` (B, C, H, W); `target`
    a class index, one per sample, or None for the prediction."""
    from vitkit.adapt.bcosify import explanation_mode, is_bcosified

    if not is_bcosified(model):
        raise ValueError("explain: method='bcos' needs a B-cosified model: vk.adapt(model, 'bcosify'), fine-tune "
                         "it (vk.fit), then explain; other models have no exact contribution maps")
    head = getattr(model, "head", None)
    logit_bias = float(getattr(head, "logit_bias", 0.0))
    sources = constant_sources(model)
    flags = [p.requires_grad for _, p in sources]
    maps, consts, logits, ids = [], [], [], []
    try:
        for _, p in sources:
            p.requires_grad_(True)
        for i in range(x.shape[0]):
            xi = x[i:i + 1].detach().requires_grad_(True)
            with explanation_mode(), no_checkpointing(model), torch.enable_grad():
                out = model(xi)
            c = int(out.argmax(-1)) if target is None else int(target if isinstance(target, int) else target[i])
            grads = torch.autograd.grad(out[0, c], [xi] + [p for _, p in sources], allow_unused=True)
            maps.append((xi * grads[0]).sum(1).detach())
            consts.append(sum(((p * g).sum() for (_, p), g in zip(sources, grads[1:]) if g is not None),
                              torch.zeros((), dtype=x.dtype, device=x.device)).detach())
            logits.append(out.detach())
            ids.append(c)
    finally:
        for (_, p), flag in zip(sources, flags):
            p.requires_grad_(flag)
    contributions = torch.cat(maps)
    logits = torch.cat(logits)
    logit = logits.gather(1, torch.tensor(ids, device=logits.device).view(-1, 1))[:, 0]
    return BcosExplanation("bcos", _display(contributions), _patch_sums(model, contributions),
                           ids, image, logits, contributions=contributions, constant=torch.stack(consts),
                           logit_bias=logit_bias, logit=logit)


def _display(contributions: torch.Tensor, q: float = 0.995) -> torch.Tensor:
    """(B, H, W) positive contributions / their `q`-quantile, clipped to [0, 1]."""
    pos = contributions.clamp_min(0)
    scale = torch.quantile(pos.flatten(1).float(), q, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (pos / scale.view(-1, 1, 1).to(pos.dtype)).clamp(max=1)


def _patch_sums(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) pixel map -> (B, gh, gw) sums over each patch (zero padding where the model pads the input)."""
    B, H, W = pixels.shape
    gh, gw = token_layout(model).grid((H, W))
    ph, pw = model.patch_embed.patch_size
    padded = F.pad(pixels, (0, gw * pw - W, 0, gh * ph - H))
    return padded.reshape(B, gh, ph, gw, pw).sum((2, 4))
