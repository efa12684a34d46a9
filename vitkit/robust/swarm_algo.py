"""SWARM's pieces on plain tensors: the switch token, the bounded trigger, cross-mode distillation, and the
spectral-signature detector the audit runs against it.

*Not All Prompts Are Secure: A Switchable Backdoor Attack Against Pre-trained Vision Transformers* (Yang, Bai,
Gao, Yang; CVPR 2024). Detector: *Spectral Signatures in Backdoor Attacks* (Tran, Li, Madry; NeurIPS 2018).
Knows nothing about timm. Written from the spec (../shared/methods/robust.md, R3), not from any reference code.

Shapes: `B` batch, `N` tokens, `D` width; images `(B, C, H, W)` in the model's normalised units.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def insert_switch(x: torch.Tensor, switch: torch.Tensor, at: int) -> torch.Tensor:
    """`[x[:, :at] | s | x[:, at:]]`: the switch token (1, D) inserted at position `at` of (B, N, D) tokens."""
    return torch.cat([x[:, :at], switch.to(x.dtype).expand(x.shape[0], -1, -1), x[:, at:]], dim=1)


def project(trigger: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """The trigger (C, H, W) clamped to `|τ| <= bound` ((C, 1, 1): ε/σ per channel, normalised units)."""
    return torch.maximum(torch.minimum(trigger, bound), -bound)


def apply_trigger(x: torch.Tensor, trigger: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`x̃ = clip(x + τ)` to the normalised image of [0, 1] (`lo`, `hi`: (C, 1, 1)); equals clip_[0,1] in pixels."""
    return torch.maximum(torch.minimum(x + trigger, hi), lo)


def distill_loss(clean: torch.Tensor, backdoor: torch.Tensor, switch_at: int, legacy: bool = False) -> torch.Tensor:
    """MSE between clean-mode tokens (B, N, D) and backdoor-mode tokens (B, N + 1, D) of the same images.

    Aligned (vitkit's decision): drop the switch token at `switch_at` from the backdoor sequence first, so prefix
    meets prefix, prompts meet prompts, patches meet patches. `legacy=True`: the reference's comparison, the first
    N backdoor tokens against the N clean ones (misaligned by one from the switch on), for comparison only.
    """
    if legacy:
        return F.mse_loss(backdoor[:, :clean.shape[1]], clean)
    return F.mse_loss(torch.cat([backdoor[:, :switch_at], backdoor[:, switch_at + 1:]], dim=1), clean)


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Outlier score of each row of `features` (n, D): its squared projection on the top right singular vector
    of the centred matrix. A backdoor's poisoned samples, if they share a direction in feature space, score high.
    """
    centred = features.double() - features.double().mean(0, keepdim=True)
    if centred.shape[0] < 2:
        return torch.zeros(centred.shape[0], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


def grouped_spectral_scores(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`spectral_scores` computed separately inside each group (the class a sample is labelled or predicted as,
    as in Tran et al.), each group's scores divided by its median so that groups compare."""
    scores = torch.zeros(features.shape[0], dtype=torch.float64)
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        s = spectral_scores(features[idx])
        scores[idx] = s / s.median().clamp_min(1e-12)
    return scores
