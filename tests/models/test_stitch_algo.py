"""vitkit/models/stitch_algo.py beyond test_stitch.py: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- the stitching layer with rank 0 ("least squares only")
and rank 1, a trained low-rank update, the update's initial scale, the too-small calibration batch, FLOPs bins that
do not start at 0, and route sampling drawn from the given generator alone. Expected values in plain torch."""
from __future__ import annotations

import pytest
import torch

from vitkit.models.stitch_algo import StitchLayer, flops_bins, least_squares, sample_route


def test_least_squares_needs_more_rows_than_the_width():
    for rows in (6, 8):
        with pytest.raises(ValueError, match=f"stitch: the calibration batch gives {rows} token rows for a 8-wide"):
            least_squares(torch.randn(rows, 8), torch.randn(rows, 3))
    w, b = least_squares(torch.randn(9, 8), torch.randn(9, 3))
    assert w.shape == (8, 3) and b.shape == (3,)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_stitch_layer_is_least_squares_plus_the_trained_low_rank_update(rank):
    torch.manual_seed(rank)
    layer = StitchLayer(8, 5, rank)
    names = {n for n, _ in layer.named_parameters()}
    assert names == ({"bias"} if rank == 0 else {"bias", "down", "up"})
    x, y = torch.randn(2, 20, 8), torch.randn(2, 20, 5)
    if rank:
        assert layer.down.shape == (8, rank) and layer.up.shape == (rank, 5)
        with torch.no_grad():
            layer.up.normal_()  # as if trained; re-initialising starts from the least-squares map again
    layer.init_least_squares(x, y)
    a = torch.cat([x.reshape(-1, 8), torch.ones(40, 1)], 1).double()
    solution = torch.linalg.pinv(a) @ y.reshape(-1, 5).double()  # the normal equations' minimum-norm solution
    w, b = solution[:-1].float(), solution[-1].float()
    torch.testing.assert_close(layer(x), x @ w + b, atol=1e-5, rtol=1e-5)
    if rank:
        with torch.no_grad():
            layer.up.normal_()
        torch.testing.assert_close(layer(x), x @ (w + layer.down @ layer.up) + b, atol=1e-5, rtol=1e-5)


def test_low_rank_update_starts_at_lora_scale():
    """`down` ~ N(0, 1/in_dim) (LoRA's A), so that `x @ down` keeps the tokens' scale; `up` starts at zero."""
    torch.manual_seed(0)
    layer = StitchLayer(256, 64, 16)
    assert abs(float(layer.down.detach().std()) * 256 ** 0.5 - 1) < 0.05
    assert not layer.up.any()


def test_flops_bins_away_from_zero():
    assert flops_bins([1.20, 1.30, 1.35, 2.0, 2.1], bins=2) == [[0, 1, 2], [3, 4]]
    assert flops_bins([5.0, 5.0, 5.0], bins=3) == [[0, 1, 2]]


def test_sample_route_draws_from_the_generator_alone():
    groups = [[0, 1, 2], [3], [4, 5]]
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # the global generator differs; the draws must not
        g = torch.Generator().manual_seed(7)
        draws.append([sample_route(groups, g) for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 2
