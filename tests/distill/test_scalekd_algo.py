"""ScaleKD's losses and projector against plain-torch oracles written from the spec (distill.md C1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.distill import scalekd_algo as algo
from vitkit.distill.scalekd_layer import Projector


def dct_oracle(n):
    """DCT-II by its definition, orthonormal: X_k = s_k sum_i x_i cos(pi (2i+1) k / 2n)."""
    m = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            s = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
            m[k, i] = s * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return m


@pytest.mark.parametrize("h,w", [(7, 7), (5, 9)])
def test_dct_round_trip_and_dc_removal_is_mean_subtraction(h, w):
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    torch.testing.assert_close(algo.dct_matrix(h), dct_oracle(h))
    torch.testing.assert_close(algo.idct2(algo.dct2(x)), x, atol=1e-12, rtol=0)
    coeffs = algo.dct2(x)
    coeffs[..., 0, 0] = 0
    torch.testing.assert_close(algo.idct2(coeffs), x - x.mean(dim=(-2, -1), keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(algo.remove_dc(x), algo.idct2(coeffs), atol=1e-5, rtol=0)


def spatial_oracle(s, t, w):
    ns = s / s.pow(2).sum(1, keepdim=True).sqrt()
    nt = t / t.pow(2).sum(1, keepdim=True).sqrt()
    return w * ((ns - nt) ** 2).sum() / s.shape[0]


def test_losses_against_oracle_and_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(algo.spatial_loss(s, t), spatial_oracle(s, t, 0.08))
    centre = lambda f: f - f.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(algo.frequency_loss(s, t), spatial_oracle(centre(s), centre(t), 0.06))
    assert algo.frequency_loss(s, s).item() == 0 and algo.spatial_loss(s, s).item() == 0
    constants = torch.randn(1, 6, 1, 1) * 10  # per-channel constants, different for student and teacher
    torch.testing.assert_close(algo.frequency_loss(s + constants, t - 2 * constants), algo.frequency_loss(s, t))
    assert algo.frequency_loss(s + constants, s).item() < 1e-10
    assert algo.spatial_loss(s + constants, s).item() > 0.01  # the spatial view does see them
    scale = torch.rand(4, 1, 5, 5) + 0.1  # positive rescaling per position
    torch.testing.assert_close(algo.spatial_loss(s * scale, t), algo.spatial_loss(s, t))


def projector_oracle(p, s_map, query=None):
    """The projector by hand on its own weights (BatchNorm in training mode: batch statistics)."""
    x = s_map + F.interpolate(p.pos, size=s_map.shape[-2:], mode="bilinear", align_corners=False)
    conv, bn = p.kv_proj[0], p.kv_proj[1]
    x = F.conv2d(x, conv.weight, conv.bias, padding=1)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    kv = torch.relu(x).flatten(2).transpose(1, 2)
    B, C = s_map.shape[0], kv.shape[-1]
    q = (p.query[None].expand(B, -1, -1) if query is None else query) @ p.q_in.weight.T + p.q_in.bias
    q = torch.relu(q) @ p.q.weight.T + p.q.bias
    k, v = kv @ p.k.weight.T + p.k.bias, kv @ p.v.weight.T + p.v.bias
    h, d = 8, C // 8
    outs = []
    for i in range(h):
        qi, ki, vi = q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d], v[..., i * d:(i + 1) * d]
        logits = 5.0 * qi @ ki.transpose(1, 2) / math.sqrt(d)
        outs.append(torch.softmax(logits, -1) @ vi)
    u = torch.cat(outs, -1) @ p.out.weight.T + p.out.bias
    u = F.layer_norm(u, (C,), p.norm.weight, p.norm.bias, p.norm.eps)
    return u + (torch.relu(u @ p.fc1.weight.T + p.fc1.bias) @ p.fc2.weight.T + p.fc2.bias)


@pytest.mark.parametrize("s_grid,t_grid,given_query", [((14, 14), (14, 14), False), ((14, 14), (7, 7), False),
                                                       ((6, 10), (3, 5), True)])
def test_projector_against_oracle(s_grid, t_grid, given_query):
    torch.manual_seed(0)
    proj = Projector(24, 32, s_grid, t_grid, learned_query=not given_query)
    with torch.no_grad():
        for prm in proj.parameters():
            prm.add_(0.3 * torch.randn_like(prm))  # so no part is near-trivial at init
    s_map = torch.randn(8, 24, *s_grid)
    query = torch.randn(8, t_grid[0] * t_grid[1], 32) if given_query else None
    out = proj(s_map, query)
    assert out.shape == (8, t_grid[0] * t_grid[1], 32)
    assert proj.to_map(out).shape == (8, 32, *t_grid)
    torch.testing.assert_close(out, projector_oracle(proj, s_map, query), atol=1e-4, rtol=1e-4)


def test_projector_resamples_its_positional_map_for_another_student_grid():
    torch.manual_seed(0)
    proj = Projector(24, 32, (8, 8), (4, 4))
    s_map = torch.randn(8, 24, 6, 6)
    torch.testing.assert_close(proj(s_map), projector_oracle(proj, s_map), atol=1e-4, rtol=1e-4)
