"""ATS's algorithm on plain tensors: significance scores and inverse-transform sampling, one image at a time.

Fayyaz et al., *Adaptive Token Sampling For Efficient Vision Transformers*, ECCV 2022. Torch only; written from
the spec (../shared/methods/accelerate.md, A3). Everything here works on one image's real tokens, so the
tokens an image keeps never depend on the other images of its batch.
"""
from __future__ import annotations

import torch


def significance(cls_attn_sum: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`S_j = (sum_h A_h[0, j]) * ||V_j||_2`, normalised to sum 1.

    Args:
        cls_attn_sum: (n,) class-token attention summed over heads, for the candidate tokens.
        v: (n, C) their values, heads concatenated.
    """
    s = cls_attn_sum * v.norm(dim=-1)
    return s / s.sum().clamp_min(1e-12)


def inverse_transform_sample(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Pick tokens by inverse-transform sampling of the score CDF (deterministic, evenly spaced).

    Sort ascending, cumulative sum, min-max normalise to `c` in [0, 1]; `num_samples - 1` evenly spaced `y`
    from `min{c > 0}` to 1; each `y` picks the token with the nearest `c`; duplicates are removed.

    Args:
        scores: (n,) significance scores of one image's candidate tokens.
        num_samples: K; at most `min(K - 1, n)` tokens come back.

    Returns:
        (k,) indices into `scores` of the picked tokens, ascending (position order).
    """
    n = scores.shape[0]
    if n == 0 or num_samples < 2:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    sorted_scores, order = scores.sort(stable=True)
    cdf = sorted_scores.cumsum(0)
    c = (cdf - cdf[0]) / (cdf[-1] - cdf[0]).clamp_min(1e-12)
    positive = c[c > 0]
    start = positive.min() if positive.numel() else c.new_tensor(1.0)
    ys = torch.linspace(0, 1, num_samples - 1, device=scores.device, dtype=c.dtype) * (1 - start) + start
    nearest = (c[None, :] - ys[:, None]).abs().argmin(dim=1)  # first index among equal distances
    return order[nearest.unique()].sort().values
