"""SWARM's algorithm file against plain-torch oracles written from the spec (robust.md R3) and from Tran et al.
(spectral signatures): switch insertion, trigger bound and clip, distillation alignment, the detector's scores."""
from __future__ import annotations

import torch

from vitkit.robust import swarm_algo as algo


def test_switch_goes_after_prefix_and_prompts_and_aligned_distillation_ignores_it():
    torch.manual_seed(0)
    clean, s = torch.randn(2, 9, 4), torch.randn(1, 4)
    bd = algo.insert_switch(clean, s, at=3)  # prefix 1 + prompts 2
    assert bd.shape == (2, 10, 4) and torch.equal(bd[:, 3], s.expand(2, -1))
    assert torch.equal(torch.cat([bd[:, :3], bd[:, 4:]], 1), clean)
    assert algo.distill_loss(clean, bd, switch_at=3).item() == 0.0
    # the reference's comparison (first N backdoor tokens vs clean) is off by one from the switch on
    legacy = ((bd[:, :9] - clean) ** 2).mean()
    assert legacy > 0
    torch.testing.assert_close(algo.distill_loss(clean, bd, switch_at=3, legacy=True), legacy)


def test_trigger_bound_and_clip_equal_the_pixel_space_rule():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    eps = 4 / 255
    tau = algo.project(torch.randn(3, 8, 8), eps / std)
    assert ((tau * std).abs() <= eps + 1e-7).all() and ((tau * std).abs() > eps - 1e-6).any()
    pixels = torch.rand(2, 3, 8, 8)
    pixels[0, :, :2] = 0.0
    pixels[1, :, :2] = 1.0  # the clip matters on these rows
    out = algo.apply_trigger((pixels - mean) / std, tau, (0 - mean) / std, (1 - mean) / std)
    torch.testing.assert_close(out * std + mean, (pixels + tau * std).clamp(0, 1), atol=1e-6, rtol=0)


def _oracle_scores(f):
    """Tran et al.: centre the representations, take the top eigenvector of their covariance, square the
    projections (eigh of the Gram matrix, not an SVD)."""
    c = f.double() - f.double().mean(0)
    vals, vecs = torch.linalg.eigh(c.T @ c)
    return (c @ vecs[:, -1]) ** 2


def test_spectral_scores_match_the_oracle_and_flag_a_poisoned_subpopulation():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 16, generator=g)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    poisoned = torch.randn(20, 16, generator=g) + 5 * u
    f = torch.cat([clean, poisoned])
    scores = algo.spectral_scores(f)
    torch.testing.assert_close(scores, _oracle_scores(f))
    flagged = set(scores.topk(30).indices.tolist())  # the 1.5 x poison budget removal of Tran et al.
    assert len(flagged & set(range(200, 220))) >= 19, sorted(flagged)


def test_grouped_scores_score_each_group_on_its_own():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(40, 8, generator=g)
    f[20:] = f[20:] * 10 + 3  # a second, differently scaled group
    groups = torch.tensor([0] * 20 + [1] * 20)
    scores = algo.grouped_spectral_scores(f, groups)
    for k in (0, 1):
        own = _oracle_scores(f[groups == k])
        torch.testing.assert_close(scores[groups == k], own / own.median())
