"""Tube masking and tubelet targets for masked video pre-training (VideoMAE), in plain torch."""
from __future__ import annotations

import torch


def num_masked(patches: int, ratio: float) -> int:
    """Spatial positions masked per time slot: round(ratio·patches), as `tube_mask` draws them."""
    return int(round(ratio * patches))


def tube_mask(batch: int, slots: int, patches: int, ratio: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(keep, masked)` token indices `(B, slots·n_keep)`, `(B, slots·n_mask)` into a sequence of `slots` time
    slots of `patches` tokens each (prefix tokens excluded): per sample, round(ratio·patches) spatial positions
    are drawn and masked in *every* time slot (a tube), so a masked patch cannot be copied from its neighbour
    in time. Indices ascend."""
    n_mask = num_masked(patches, ratio)
    order = torch.rand(batch, patches, device=device).argsort(1)
    keep_sp, mask_sp = order[:, n_mask:].sort(1).values, order[:, :n_mask].sort(1).values
    offsets = (torch.arange(slots, device=device) * patches)[None, :, None]
    return (offsets + keep_sp[:, None]).flatten(1), (offsets + mask_sp[:, None]).flatten(1)


def tubelets(clips: torch.Tensor, t: int, ph: int, pw: int) -> torch.Tensor:
    """Clips `(B, C, T, H, W)` -> tubelet pixels `(B, T/t·H/ph·W/pw, t·ph·pw·C)`, tokens ordered (slot, row, col)
    like the tubelet embedding's."""
    B, C, T, H, W = clips.shape
    x = clips.reshape(B, C, T // t, t, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (T // t) * (H // ph) * (W // pw), t * ph * pw * C)
