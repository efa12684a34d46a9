"""PGD and FGSM (spec R1) against plain-torch oracles written here from the spec, on a tiny ViT whose mean/std
are far from 0/1, so an attack that ignored the normalisation or put ε in normalised units would fail."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
EPS = 8 / 255


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 2}, mean=MEAN, std=STD).eval()


@pytest.fixture(scope="module")
def data(model):
    torch.manual_seed(1)
    x = torch.rand(6, 3, 32, 32)
    x[0, :, :4] = 0.0  # pixels at the range's edges: the clip to [0, 1] must act
    x[1, :, :4] = 1.0
    return x, logits(model, x).argmax(-1)  # the model's own predictions: every sample starts correct


# ------------------------------------------------------------------------------------ oracles (no vitkit code)
def logits(model, x, mean=MEAN, std=STD):
    """The model's logits for pixel images: normalise with the stated statistics, then the model."""
    return model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def grad_of(model, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(logits(model, x), y, reduction="sum"), x)
    return g


def unit(g, norm):
    return g.sign() if norm == "linf" else g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def oracle_fgsm(model, x, y, eps, norm="linf", sign=1.0):
    return (x + sign * eps * unit(grad_of(model, x, y), norm)).clamp(0, 1)


def oracle_pgd(model, x, y, eps, alpha, steps, norm="linf", sign=1.0, start=None):
    adv = x.clone() if start is None else start
    for _ in range(steps):
        adv = adv + sign * alpha * unit(grad_of(model, adv, y), norm)
        d = adv - x
        if norm == "linf":
            d = d.clamp(-eps, eps)
        else:
            n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * torch.clamp(eps / (n + 1e-12), max=1.0)
        adv = (x + d).clamp(0, 1)
    return adv


def mean_ce(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(logits(model, x), y))


# ------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("method,kwargs", [("pgd", {"norm": "linf"}), ("pgd", {"norm": "l2"}),
                                           ("fgsm", {"norm": "linf"}), ("fgsm", {"norm": "l2"})])
def test_eps_zero_returns_the_images_exactly(model, data, method, kwargs):
    x, y = data
    result = vk.attack(model, x, y, method=method, eps=0.0, **kwargs)  # random start on: U(-0, 0)
    assert torch.equal(result.images, x)
    assert result.robust_accuracy == result.clean_accuracy == 1.0 and result.attack_success_rate == 0.0


# ------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_fgsm_matches_the_oracle_in_pixel_space(model, data, norm, eps):
    x, y = data
    expected = oracle_fgsm(model, x, y, eps, norm)
    got = vk.attack(model, x, y, method="fgsm", eps=eps, norm=norm).images
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.equal(got, x)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", EPS, 2 / 255), ("l2", 0.3, 0.1)])
def test_pgd_matches_the_oracle(model, data, norm, eps, alpha):
    x, y = data
    expected = oracle_pgd(model, x, y, eps, alpha, 5, norm)
    got = vk.attack(model, x, y, method="pgd", eps=eps, alpha=alpha, steps=5, norm=norm, random_start=False)
    torch.testing.assert_close(got.images, expected, atol=1e-6, rtol=0)
    if norm == "l2":  # the projection is active: the perturbation sits on the sphere for most samples
        norms = (got.images - x).flatten(1).norm(dim=1)
        assert (norms <= eps + 1e-5).all() and (norms > eps - 1e-3).sum() >= 3, norms


def test_pgd_random_start_is_uniform_in_the_ball_and_seeded(model, data):
    x, y = data
    g = torch.Generator().manual_seed(7)
    start = (x + torch.rand(x.shape, generator=g) * 2 * EPS - EPS).clamp(0, 1)
    expected = oracle_pgd(model, x, y, EPS, 2 / 255, 3, start=start)
    a = vk.attack(model, x, y, method="pgd", steps=3, seed=7).images
    torch.testing.assert_close(a, expected, atol=1e-6, rtol=0)
    assert torch.equal(a, vk.attack(model, x, y, method="pgd", steps=3, seed=7).images)
    assert not torch.equal(a, vk.attack(model, x, y, method="pgd", steps=3, seed=8).images)


def test_targeted_descends_towards_the_target(model, data):
    x, y = data
    t = (y + 1) % 10
    expected = oracle_pgd(model, x, t, EPS, 2 / 255, 10, sign=-1.0)
    result = vk.attack(model, x, y, targets=t, method="pgd", random_start=False)
    torch.testing.assert_close(result.images, expected, atol=1e-6, rtol=0)
    assert mean_ce(model, result.images, t) < mean_ce(model, x, t)
    assert result.report()["targeted"] and torch.equal(result.targets, t)


# ------------------------------------------------------------------------------------ the ε ball, pixel space
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_perturbations_stay_in_the_pixel_space_ball(model, data, norm, eps):
    x, y = data
    result = vk.attack(model, x, y, method="pgd", eps=eps, alpha=eps / 2, steps=4, norm=norm)
    d = (result.images - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size
    assert size.max() > 0.9 * eps  # in pixel units: ε/std (normalised units) or ε·std would miss this
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_one_step_pgd_of_size_eps_without_start_is_fgsm_bit_for_bit(model, data):
    x, y = data
    pgd = vk.attack(model, x, y, method="pgd", steps=1, alpha=EPS, random_start=False).images
    fgsm = vk.attack(model, x, y, method="fgsm", eps=EPS).images
    assert torch.equal(pgd, fgsm)


def test_pgd_loss_exceeds_fgsm_and_clean(model, data):
    x, y = data
    pgd = vk.attack(model, x, y, method="pgd", eps=2 / 255, alpha=0.5 / 255, steps=10).images
    fgsm = vk.attack(model, x, y, method="fgsm", eps=2 / 255).images
    clean, l_fgsm, l_pgd = mean_ce(model, x, y), mean_ce(model, fgsm, y), mean_ce(model, pgd, y)
    assert l_pgd >= l_fgsm > clean, (l_pgd, l_fgsm, clean)


# ------------------------------------------------------------------------------------ the model is untouched
@pytest.mark.parametrize("backend", ["vitkit", "torchattacks"])
def test_the_model_is_never_updated(data, backend):
    x, y = data
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 2}, mean=MEAN, std=STD)
    model.train()
    model.blocks[0].eval()  # mixed modes come back as they were
    model.pos_embed.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    vk.attack(model, x, y, method="pgd", steps=2, backend=backend)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert not model.pos_embed.requires_grad and model.head.weight.requires_grad


# ------------------------------------------------------------------------------------ torchattacks backend
@pytest.mark.parametrize("method,kwargs", [("pgd", {"random_start": False, "steps": 3}),
                                           ("pgd", {"random_start": False, "steps": 3, "norm": "l2", "eps": 0.3,
                                                    "alpha": 0.1}),
                                           ("fgsm", {}), ("fgsm", {"norm": "l2", "eps": 0.5})])
def test_torchattacks_backend_agrees(model, data, method, kwargs):
    x, y = data
    ours = vk.attack(model, x, y, method=method, **kwargs)
    theirs = vk.attack(model, x, y, method=method, backend="torchattacks", **kwargs)
    torch.testing.assert_close(theirs.images, ours.images, atol=1e-6, rtol=0)
    assert theirs.backend == "torchattacks" and not torch.equal(theirs.images, x)


def test_torchattacks_targeted_and_random_start_stay_in_the_ball(model, data):
    x, y = data
    t = (y + 1) % 10
    ours = vk.attack(model, x, y, targets=t, random_start=False, steps=3)
    theirs = vk.attack(model, x, y, targets=t, random_start=False, steps=3, backend="torchattacks")
    torch.testing.assert_close(theirs.images, ours.images, atol=1e-6, rtol=0)
    rs = vk.attack(model, x, y, steps=2, backend="torchattacks").images
    assert (rs - x).abs().max() <= EPS + 1e-6


# ------------------------------------------------------------------------------------ metrics
def test_metrics_follow_their_definitions():
    labels = torch.tensor([0, 1, 2, 3, 4])
    clean = torch.tensor([0, 1, 2, 3, 0])  # 4 correct
    adv = torch.tensor([0, 5, 5, 3, 0])  # 2 of the 4 made wrong
    r = vk.robust.AttackResult("pgd", "vitkit", None, torch.zeros(5, 3, 2, 2), torch.zeros(5, 3, 2, 2), labels,
                               clean, adv)
    assert (r.clean_accuracy, r.robust_accuracy, r.attack_success_rate) == (0.8, 0.4, 0.5)
    targeted = vk.robust.AttackResult("pgd", "vitkit", None, r.images, r.clean, labels, clean, adv,
                                      targets=torch.tensor([5, 5, 5, 3, 5]))
    assert targeted.attack_success_rate == 2 / 3  # label 3 == target 3 is not counted


def test_result_unpacks_and_transfers(model, data):
    x, y = data
    x_adv, report = vk.attack(model, x, y, method="fgsm")
    assert x_adv.shape == x.shape and report["n"] == 6 and report["linf_max"] <= EPS + 1e-6
    other = make_variant("plain")
    moved = vk.attack(model, x, y, method="fgsm").transfer(other)
    mean, std = vk.robust.norm_stats(other)
    with torch.no_grad():
        expected = logits(other, x_adv, mean, std).argmax(-1)
    assert torch.equal(moved.adv_pred, expected) and torch.equal(moved.labels, y)


# ------------------------------------------------------------------------------------ variants, checkpointing
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fgsm_on_every_variant(name, data):
    x, y = data
    model = make_variant(name)
    mean, std = vk.robust.norm_stats(model)
    expected = (x[:2] + EPS * grad_of_stats(model, x[:2], y[:2], mean, std).sign()).clamp(0, 1)
    torch.testing.assert_close(vk.attack(model, x[:2], y[:2], method="fgsm").images, expected, atol=1e-6, rtol=0)


def grad_of_stats(model, x, y, mean, std):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(logits(model, x, mean, std), y, reduction="sum"), x)
    return g


def test_gradient_checkpointing_gives_the_same_attack(data):
    x, y = data
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 2}, mean=MEAN, std=STD).eval()
    plain = vk.attack(model, x, y, method="pgd", steps=2, random_start=False).images
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(vk.attack(model, x, y, method="pgd", steps=2, random_start=False).images, plain,
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change,error,message", [
    (dict(eps=-0.1), ValueError, r"pgd: `eps` must be >= 0, got -0.1"),
    (dict(labels=[0, 1]), ValueError, r"`labels` has 2 entries but there are 6 images"),
    (dict(labels=[0, 1, 2, 3, 4, 10]), ValueError, r"classes in \[0, 10\)"),
    (dict(labels=None), ValueError, r"`labels` are required"),
    (dict(images="x"), TypeError, r"must be a torch.Tensor"),
    (dict(images=torch.rand(6, 3, 32, 32) * 2 - 0.5), ValueError, r"pixel values in \[0, 1\].*before normalisation"),
    (dict(method="pdg"), ValueError, r"unknown method `pdg`; did you mean `pgd`"),
    (dict(backend="art"), ValueError, r"unknown backend `art`"),
    (dict(epsilon=0.1), TypeError, r"unknown config field\(s\) \['epsilon'\]"),
    (dict(norm="l1"), TypeError, r"`norm` must be 'linf' \| 'l2'"),
    (dict(steps=0), ValueError, r"`steps` must be >= 1"),
    (dict(targets=[1, 2]), ValueError, r"`targets` has 2 entries"),
    (dict(batch_size=0), ValueError, r"`batch_size` must be an integer >= 1"),
])
def test_bad_input_is_one_clear_error(model, data, change, error, message):
    x, y = data
    kwargs = dict(images=x, labels=y, method="pgd")
    kwargs.update(change)
    with pytest.raises(error, match=message):
        vk.attack(model, **kwargs)


@pytest.mark.parametrize("method,config", [("vpt", {"num_prompts": 2, "deep": True})])
def test_adapted_models_are_attacked_and_keep_their_trainable_set(data, method, config):
    x, y = data
    model = make_variant("plain")
    vk.adapt(model, method, **config)  # prompts through the block runner; the backbone frozen, prompts trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mean, std = vk.robust.norm_stats(model)
    expected = (x[:2] + EPS * grad_of_stats(model, x[:2], y[:2], mean, std).sign()).clamp(0, 1)
    torch.testing.assert_close(vk.attack(model, x[:2], y[:2], method="fgsm").images, expected, atol=1e-6, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable and trainable
