"""ForAug against a plain-torch oracle (spec ../shared/methods/augment-pretrain.md, D2): the composite is
mask·fg + (1 - mask)·bg with the background's own foreground in-painted by diffusion."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.augment import foraug_algo as algo
from vitkit.augment import mix_batch


def images(B=4, seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def box_masks(B=4, top=10, size=12):
    m = torch.zeros(B, 32, 32)
    m[:, top:top + size, top:top + size] = 1.0
    return m


def filled_by_hand(img, mask, iters=16):
    """Oracle in-paint: region = mask > 0.05 grown by one pixel (8-neighbourhood); start at the mean of the other
    pixels; `iters` times, each region pixel <- mean of its in-image 3x3 neighbours (Jacobi, from the last sweep)."""
    H, W = mask.shape
    hard = mask > 0.05
    region = torch.zeros(H, W, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.zeros(H, W, dtype=torch.bool)
            shifted[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                hard[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
            region |= shifted
    x = img.clone()
    for c in range(3):
        x[c][region] = img[c][~region].mean()
    padded_ones = F.pad(torch.ones(1, 1, H, W), (1, 1, 1, 1))
    count = F.conv2d(padded_ones, torch.ones(1, 1, 3, 3))[0, 0]
    for _ in range(iters):
        sums = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))[:, 0]
        x = torch.where(region, sums / count, img)
    return x


def test_probability_zero_is_identity():
    model = vk.augment(make_variant("plain"), "foraug", prob=0.0)
    x, y = images(), torch.arange(4)
    mix = mix_batch(model, x, y, [box_masks()])
    assert torch.equal(mix.images, x) and torch.equal(mix.target(10), y)


def test_composite_equals_mask_fg_plus_rest_bg():
    # centred box masks of equal size, no size jitter, centred position, hard edge: the foreground stays in place
    model = vk.augment(make_variant("plain"), "foraug", size_jitter=0.0, position_n=0, edge_sigma=0.0)
    x, y, m = images(), torch.arange(4), box_masks()
    torch.manual_seed(0)
    out = mix_batch(model, x, y, [m]).images
    others = 0
    for i in range(4):
        candidates = [m[i] * x[i] + (1 - m[i]) * filled_by_hand(x[j], m[j]) for j in range(4)]
        errors = [(out[i] - c).abs().max().item() for c in candidates]
        j = int(np.argmin(errors))
        assert errors[j] < 1e-5, f"sample {i}: no background matches (errors {errors})"
        others += j != i
    assert others > 0, "every sample got its own background: the case does not test recombination"


def test_pasted_area_ratio_position_and_fill_fraction():
    fg = torch.randn(3, 32, 32)
    disk = ((torch.arange(32)[:, None] - 8) ** 2 + (torch.arange(32)[None] - 8) ** 2 <= 25).float()
    placed, alpha = algo.place(fg, disk, ratio=0.15, u=0.5, v=0.5)
    assert abs(alpha.sum().item() / 1024 - 0.15) < 0.02, alpha.sum().item() / 1024  # object pixels, not its box
    rows, cols = torch.nonzero(alpha > 0.5, as_tuple=True)
    centre = ((rows.min() + rows.max()).item() / 2, (cols.min() + cols.max()).item() / 2)
    assert abs(centre[0] - 15.5) <= 1 and abs(centre[1] - 15.5) <= 1, centre
    lo, hi = 0.1 * 0.7, 0.2 * 1.3
    assert [algo.target_ratio(0.1, 0.2, 0.3, u) for u in (0, 1)] == pytest.approx([lo, hi])
    top_left = algo.place(fg, disk, ratio=disk.mean().item(), u=0.0, v=0.0)[1]
    assert top_left[0].any() and top_left[:, 0].any()  # u = v = 0: flush with the top-left corner
    big = algo.place(fg, disk, ratio=2.0, u=0.3, v=0.7)[1]  # larger than the image: centre-cropped, no jut-out
    assert big.shape == (32, 32)


def test_label_stays_the_foregrounds_and_bad_masks_refused():
    model = vk.augment(make_variant("plain"), "foraug")
    x, y = images(), torch.arange(4)
    torch.manual_seed(1)
    first = mix_batch(model, x, y, [box_masks()])
    assert torch.equal(first.target(10), y)
    torch.manual_seed(1)
    assert torch.equal(mix_batch(model, x, y, [box_masks()]).images, first.images)  # same seed, same samples
    with pytest.raises(ValueError, match="foraug: masks='given' needs batches of"):
        mix_batch(model, x, y)
    with pytest.raises(ValueError, match="do not match images"):
        mix_batch(model, x, y, [torch.ones(4, 16, 16)])


def test_segment_mask_source():
    from vitkit.augment.foraug import segment_masks

    model = make_variant("registers")
    m = segment_masks(model, images(2), (0.5, 0.5))
    assert m.shape == (2, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0} and m[:, 16, 16].all()


class Triples(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.x, self.y, self.m = images(n), torch.arange(n) % 10, box_masks(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.m[i]


@pytest.mark.parametrize("source", ["given", "segment"])
def test_fit_runs_with_foraug(source, tmp_path):
    model = vk.augment(vk.adapt(make_variant("plain"), "full"), "foraug", masks=source)
    vk.augment(model, "transmix")  # composes: foreground recombination, then TransMix
    result = vk.fit(model, Triples(), epochs=1, batch_size=8, lr=1e-3, out_dir=tmp_path, progress=False,
                    save_model=False)
    assert math.isfinite(result.history[-1]["train_loss"])
