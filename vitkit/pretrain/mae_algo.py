"""MAE's masking and targets, in plain torch (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

lightly's `random_token_mask` keeps `int(N·(1-ratio))` tokens and protects only index 0 (the class token), so
registers could be masked; here the mask is drawn over the patch tokens only, with round(ratio·N_p) masked, and
every prefix token (class, registers) is kept.
"""
from __future__ import annotations

from typing import Optional

import torch


def num_masked(num_patches: int, ratio: float) -> int:
    """round(ratio·N_p), halves rounded up; at least one patch must stay visible and one be masked."""
    n = int(ratio * num_patches + 0.5)
    if not 0 < n < num_patches:
        raise ValueError(f"mae: `mask_ratio` {ratio} masks {n} of {num_patches} patches; choose a ratio that "
                         "masks at least one patch and leaves at least one visible")
    return n


def random_patch_mask(batch: int, num_patches: int, num_prefix: int, ratio: float, *,
                      device: Optional[torch.device] = None,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the token sequence `[prefix tokens, patches]` of the tokens to keep and to mask.

    Returns:
        `idx_keep (B, num_prefix + N_p - M)`: every prefix index `0..num_prefix-1`, then the visible patches;
        `idx_mask (B, M)`: the masked patches, `M = round(ratio·N_p)`, each image its own uniform draw.
    """
    m = num_masked(num_patches, ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1) + num_prefix  # (B, N_p): patch positions in the sequence, shuffled
    prefix = torch.arange(num_prefix, device=order.device).expand(batch, num_prefix)
    return torch.cat([prefix, order[:, m:]], dim=1), order[:, :m]

