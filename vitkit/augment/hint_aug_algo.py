"""Hint-Aug's pieces as tensor functions (torch only): AOD patch scores and choice, the patch mask, CFI targets,
one CFI step, smoothed labels. See `hint_aug.py`.

Shapes: `B` batch, `N` tokens (prefix then `G = gh·gw` patches; prompts already removed), `C` classes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def patch_scores(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """AOD score of each patch: head-mean attention (B, N, N), each key column L2-normalised over the queries,
    then averaged over the queries; prefix columns dropped -> (B, G)."""
    return F.normalize(attn, dim=1).mean(1)[:, num_prefix:]


def choose_patches(teacher: torch.Tensor, student: torch.Tensor, k: int, threshold: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch indices (B, k), teacher branch (B,) bool). `Δ = teacher − student`; a sample whose `max|Δ|` exceeds
    `threshold` takes the k patches of largest Δ (attention the tuned model lost), else the k patches its own
    (student) attention scores highest."""
    delta = teacher - student
    drifted = delta.abs().amax(1) > threshold
    by_delta, by_student = delta.topk(k, dim=1).indices, student.topk(k, dim=1).indices
    return torch.where(drifted[:, None], by_delta, by_student), drifted


def patch_mask(index: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, gh·ph, gw·pw) mask, 1 on the pixels of the chosen patches (row-major patch index)."""
    gh, gw = grid
    cells = torch.zeros(index.shape[0], gh * gw, device=index.device).scatter_(1, index, 1.0)
    cells = cells.view(-1, 1, gh, gw)
    return cells.repeat_interleave(patch_size[0], dim=2).repeat_interleave(patch_size[1], dim=3)


def confusion_targets(acc: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CFI target of each sample: `softmax(acc[y] / T)` (B, C); `acc[c]` sums `logits − min(logits)` over class-c
    training samples of the previous epoch."""
    return (acc[labels] / temperature).softmax(-1)


def cfi_step(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mask: torch.Tensor,
             radius: torch.Tensor, low: torch.Tensor, high: torch.Tensor, lr: float = 0.1) -> torch.Tensor:
    """One Adam step on δ that *increases* `loss_of(x + δ ⊙ mask)`, from `δ ~ U(−radius, radius)`; δ is then
    projected onto the radius ball (per channel, normalised units) and the patch pixels clamped to [low, high].

    Returns the perturbed images `x + δ ⊙ mask` (B, C, H, W), detached."""
    radius = radius.view(1, -1, 1, 1)
    delta = ((torch.rand_like(x) * 2 - 1) * radius).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr, maximize=True)
    loss = loss_of(x + delta * mask)
    (grad,) = torch.autograd.grad(loss, delta)
    delta.grad = grad
    opt.step()
    with torch.no_grad():
        delta = torch.maximum(torch.minimum(delta, radius), -radius)
        inside = torch.maximum(torch.minimum(x + delta, high.view(1, -1, 1, 1)), low.view(1, -1, 1, 1))
        return x + (inside - x) * mask  # pixels outside the chosen patches are left exactly as they were


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """(B, C): `1 − smoothing` on the label, `smoothing` spread evenly over the other classes."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot * (1 - smoothing) + (1 - one_hot) * smoothing / max(num_classes - 1, 1)
