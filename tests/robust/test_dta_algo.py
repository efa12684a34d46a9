"""DTA's algorithm file against plain-torch expectations written from the spec (robust.md R2): the loss is 1 at
δ = 0, the crafting loop stays in the ε-ball and lowers the loss, and the layer rule picks the layer that moves
the *final* features most, not the one whose own cosine falls most."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkit.robust import dta_algo as algo


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.GELU(),
                               torch.nn.Conv2d(8, 8, 3, bias=False))


def test_loss_is_one_at_zero_perturbation():
    g, x = _net(), torch.rand(4, 3, 12, 12)
    x_adv, losses = algo.craft(g, x, torch.zeros_like(x), eps=8 / 255, steps=0, lr=1.0)
    assert torch.equal(x_adv, x)
    assert abs(losses[0] - 1.0) < 1e-6, losses


def test_loss_equals_a_hand_written_flattened_cosine():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    a2, b2 = a.reshape(3, -1), b.reshape(3, -1)
    by_hand = (a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1))
    torch.testing.assert_close(algo.cosine(a, b), by_hand)
    assert not torch.allclose(algo.cosine(a, b), F.cosine_similarity(a, b, dim=-1).mean(1)), \
        "per-token cosines averaged differ from the flattened cosine: the test would not see an axis mix-up"


def test_crafting_stays_in_the_ball_and_lowers_the_loss():
    g, x = _net(), torch.rand(4, 3, 12, 12)
    eps = 10 / 255
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_adv, losses = algo.craft(g, x, w, eps=eps, steps=10, lr=1.0)
    assert (x_adv - x).abs().max() <= eps + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert len(losses) == 11 and losses[-1] < losses[0] - 0.01, losses
    # the returned images are those the last loss was measured on
    with torch.no_grad():
        assert abs(algo.cosine(g(x_adv), g(x)).mean().item() - losses[-1]) < 1e-6


def test_crafting_touches_no_parameter_of_the_source():
    g, x = _net(), torch.rand(2, 3, 12, 12)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    algo.craft(g, x, torch.rand_like(x) * 2 - 1, eps=0.1, steps=3, lr=1.0)
    assert all(p.grad is None for p in g.parameters())
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())


def test_layer_rule_picks_the_layer_that_moves_the_final_features():
    """Constructed case: layer 0 sees only channel 0 (and is very sensitive: its own cosine falls most), layer 1
    sees only channel 2, and the final features read only channel 2. The rule must pick layer 1; a rule on the
    attacked layer's own cosine would pick layer 0."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8) * 0.5 + 0.25
    layer0 = lambda t: torch.sin(40 * t[:, :1])  # noqa: E731
    layer1 = lambda t: t[:, 2:] - 0.5  # noqa: E731
    final = lambda t: (t[:, 2:] - 0.5).mean((2, 3)) + torch.tanh(8 * (t[:, 2:] - 0.5)).flatten(1)  # noqa: E731
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kw = dict(eps=0.2, steps=10, lr=1.0)
    own = [algo.craft(g, x, w, **kw)[1][-1] for g in (layer0, layer1)]
    assert own[0] < own[1], f"construction: layer 0's own cosine should fall most, got {own}"
    chosen, curve = algo.choose_layer([layer0, layer1], final, x, w, **kw)
    assert chosen == 1 and curve[0] > curve[1] + 0.3, (chosen, curve)


def test_sign_noise_has_the_full_budget_on_every_pixel_inside_the_range():
    x = torch.full((2, 3, 4, 4), 0.5)
    noisy = algo.sign_noise(x, 0.1, torch.Generator().manual_seed(0))
    torch.testing.assert_close((noisy - x).abs(), torch.full_like(x, 0.1))
    assert noisy.min() >= 0 and noisy.max() <= 1
