"""vitkit/explain/volume_algo.py beyond test_segment_volume.py: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- several clicks off the cell centres (trilinear sampling with
border clamping), `reduce="max"`, the spec's defaults (floor 0.25, power 2.5, mean), and the transfer function's
scale, clamps and all-zero volume. The expected values are written out voxel by voxel; nothing from vitkit computes
them."""
from __future__ import annotations

import math

import torch

from vitkit.explain.volume_algo import click_similarity, feature_grid, normalise, to_uint8


def sample(f: torch.Tensor, click, shape) -> torch.Tensor:
    """f (C, G0, G1, G2) at a voxel: voxel v of D sits at cell coordinate (v + ½)·G/D − ½, clamped to the grid;
    trilinear weights over the 8 surrounding cells."""
    corners = []
    for a in range(3):
        g = f.shape[a + 1]
        u = min(max((click[a] + 0.5) * g / shape[a] - 0.5, 0.0), g - 1.0)
        lo = math.floor(u)
        corners.append([(lo, 1 - (u - lo)), (min(lo + 1, g - 1), u - lo)])
    return sum(w0 * w1 * w2 * f[:, i0, i1, i2] for i0, w0 in corners[0] for i1, w1 in corners[1]
               for i2, w2 in corners[2])


def oracle(f, clicks, shape, floor, power, reduce):
    fn = f / f.norm(dim=0, keepdim=True)
    sims = []
    for click in clicks:
        p = sample(fn, click, shape)
        cos = torch.einsum("cxyz,c->xyz", fn, p / p.norm())
        sims.append(torch.where(cos >= floor, cos.clamp_min(0), torch.zeros_like(cos)) ** power)
    sims = torch.stack(sims)
    return sims.mean(0) if reduce == "mean" else sims.amax(0)


def test_click_similarity_off_centre_clicks_mean_max_and_defaults():
    torch.manual_seed(0)
    f = torch.randn(5, 3, 4, 5) + 0.5  # some cosines above the floor, some below
    shape, clicks = (7, 9, 11), [(0, 8, 3), (6, 2.0, 10), (3.5, 4, 0)]
    torch.testing.assert_close(click_similarity(f, clicks, shape), oracle(f, clicks, shape, 0.25, 2.5, "mean"))
    torch.testing.assert_close(click_similarity(f, clicks, shape, 0.1, 1.5, "max"),
                               oracle(f, clicks, shape, 0.1, 1.5, "max"))


def test_normalise_and_a_thin_axis():
    """Min-max to [0, 1] whatever the range; a constant volume gives zeros (not NaN); an axis far thinner than the
    middle one keeps one cell."""
    vol = torch.tensor([[[2.0, 6.0], [3.0, 5.0]]])
    torch.testing.assert_close(normalise(vol), (vol - 2) / 4)
    flat = normalise(torch.full((2, 3, 4), 7.0))
    assert flat.shape == (2, 3, 4) and not flat.any()
    assert feature_grid((2, 40, 50), 4) == (1, 4, 5)


def test_transfer_function_scale_and_clamps():
    """255 / (0.99 · max) · sim, clamped to [0, 255], rounded; an all-zero similarity gives zeros (not NaN)."""
    got = to_uint8(torch.tensor([-1.0, 0.0, 0.6, 1.99, 2.0]))
    factor = 255 / (0.99 * 2.0)
    assert got.dtype == torch.uint8
    assert got.tolist() == [0, 0, round(0.6 * factor), 255, 255] == [0, 0, 77, 255, 255]
    zero = to_uint8(torch.zeros(2, 3))
    assert zero.dtype == torch.uint8 and zero.shape == (2, 3) and not zero.any()
