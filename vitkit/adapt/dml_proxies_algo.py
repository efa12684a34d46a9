"""Proxy-Anchor loss and semantic proxies (torch only; no module, no timm). See `dml_proxies.py`.

Notation: `B` batch, `C` classes, `E` embedding width; embeddings and proxies are L2-normalised, so
`s(x, p) = x·p` is the cosine similarity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def proxy_anchor_loss(sim: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0, delta: float = 0.1,
                      mean_over: str = "all") -> torch.Tensor:
    """Proxy-Anchor (Kim et al., CVPR 2020) on similarities `sim` (B, C) to the C proxies.

        (1/|P|) Σ_{c∈P} log(1 + Σ_{x∈X_c⁺} e^{−α(s(x,p_c)−δ)}) + (1/C) Σ_c log(1 + Σ_{x∈X_c⁻} e^{α(s(x,p_c)+δ)})

    `mean_over="all"`: |P| = C (classes absent from the batch add 0 but count: the DML-proxies code);
    `"present"`: P = the classes with a positive in the batch (the Proxy-Anchor paper). `log(1 + Σ e^z)` is
    computed as `logsumexp([0, z...])` over the masked terms.
    """
    C = sim.shape[1]
    pos = F.one_hot(labels, C).bool()  # (B, C)
    neg_inf = torch.finfo(sim.dtype).min
    zero = sim.new_zeros(1, C)
    pos_z = torch.where(pos, -alpha * (sim - delta), neg_inf)
    neg_z = torch.where(~pos, alpha * (sim + delta), neg_inf)
    pos_term = torch.logsumexp(torch.cat([zero, pos_z]), dim=0)  # (C,): 0 for classes without positives
    neg_term = torch.logsumexp(torch.cat([zero, neg_z]), dim=0)
    present = pos.any(0)
    denominator = C if mean_over == "all" else present.sum().clamp(min=1)
    return pos_term.sum() / denominator + neg_term.sum() / C


def class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present (K,), mean feature of each (K, E)) of a batch `features` (B, E)."""
    classes, inverse = labels.unique(return_inverse=True)
    sums = features.new_zeros(len(classes), features.shape[1]).index_add(0, inverse, features)
    counts = torch.bincount(inverse, minlength=len(classes)).to(features.dtype)
    return classes, sums / counts[:, None]


def combine_proxies(bias: torch.Tensor, memory: torch.Tensor, ratio: float) -> torch.Tensor:
    """`p_c = normalize(ratio·b_c + (1 − ratio)·memory_c)` (C, E); `ratio = 1`: the learned proxies alone."""
    return F.normalize(ratio * bias + (1.0 - ratio) * memory, dim=-1)
