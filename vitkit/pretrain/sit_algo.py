"""SiT's (GMML-style) corruption and reconstruction loss, in plain torch.

Images (B, C, H, W) are cut into the model's patch grid (gh, gw) of (ph, pw) patches; corruption works on whole
patches only (so class, register and other prefix tokens, which are no pixels, are never touched).
"""
from __future__ import annotations

from typing import Optional

import torch


def num_corrupted(num_patches: int, frac: float) -> int:
    """round(frac·N_p) (halves up); at least one patch corrupted and one left."""
    n = int(frac * num_patches + 0.5)
    if not 0 < n < num_patches:
        raise ValueError(f"sit: `corrupt_frac` {frac} corrupts {n} of {num_patches} patches; choose a fraction that "
                         "corrupts at least one patch and leaves at least one")
    return n


def block_mask(batch: int, grid: tuple[int, int], frac: float, max_block: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, gh, gw) bool: exactly round(frac·gh·gw) patches per image, drawn as random rectangles of 1..max_block
    patches a side until the count is reached (cells of the last rectangle beyond the count are left out)."""
    gh, gw = grid
    n = num_corrupted(gh * gw, frac)
    out = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for b in range(batch):
        m = out[b]
        while int(m.sum()) < n:
            h, w = (int(torch.randint(1, min(max_block, s) + 1, (), generator=generator)) for s in (gh, gw))
            top = int(torch.randint(0, gh - h + 1, (), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (), generator=generator))
            new = torch.zeros_like(m)
            new[top:top + h, left:left + w] = True
            new &= ~m
            cells = torch.nonzero(new.flatten()).flatten()
            need = n - int(m.sum())
            cells = cells[torch.randperm(len(cells), generator=generator)[:need]]
            m.view(-1)[cells] = True
    return out


def pixel_mask(mask: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) patch mask -> (B, 1, gh·ph, gw·pw) pixel mask."""
    return mask.repeat_interleave(patch[0], 1).repeat_interleave(patch[1], 2)[:, None]


def corrupt(images: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int], replace_frac: float,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Corrupted copy of `images`: each masked patch becomes, with probability `replace_frac`, the same patch of
    the partner image (`flip(batch)`), else Gaussian noise N(0, 1) (in the normalised pixel space)."""
    B, gh, gw = mask.shape
    swap = mask & (torch.rand(B, gh, gw, generator=generator) < replace_frac)
    noise = torch.randn(images.shape, generator=generator).to(images)
    filler = torch.where(pixel_mask(swap, patch).to(images.device), images.flip(0), noise)
    return torch.where(pixel_mask(mask, patch).to(images.device), filler, images)


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh·gw, ph·pw·C), patches in row-major grid order."""
    B, C, H, W = images.shape
    ph, pw = patch
    x = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


def recon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 over the corrupted patches only: pred, target (B, G, P); mask (B, G) bool."""
    m = mask.flatten(1).to(pred.dtype)
    per_patch = (pred - target).abs().mean(-1)  # (B, G)
    return (per_patch * m).sum() / m.sum().clamp_min(1)
