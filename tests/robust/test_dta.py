"""DTA through `vk.attack` against a plain-torch oracle (spec robust.md R2): the loss is the flattened cosine of
block l's tokens of the *normalised* image (prefix + patches, or patches), 1 at δ = 0; crafting stays in the
pixel ε-ball, lowers that cosine below the random start, never touches the source, and needs no downstream
model; bad settings get one clear error."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import make_variant
from vitkit.robust import dta
from vitkit.robust.api import AttackContext

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.3, 0.4)


def source(variant="plain", seed=0):
    """A tiny ViT with a non-trivial normalisation; weights spread so features depend on the image."""
    model = make_variant(variant, seed=seed)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    with torch.no_grad():
        for p in (model.cls_token, model.reg_token, model.pos_embed):
            if p is not None:
                p.mul_(0.1)
    return model


def oracle_tokens(model, x, layer, tokens):
    """Block `layer`'s output by hand: normalise, embed, run blocks 0..layer; drop the prefix for 'patches'."""
    t = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    t = model.norm_pre(model._pos_embed(model.patch_embed(t)))
    for blk in list(model.blocks)[:layer + 1]:
        t = blk(t)
    return t[:, model.num_prefix_tokens:] if tokens == "patches" else t


def oracle_loss(model, x_adv, x, layer, tokens):
    a, b = oracle_tokens(model, x_adv, layer, tokens).flatten(1), oracle_tokens(model, x, layer, tokens).flatten(1)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def ctx_of(model):
    return AttackContext(model, torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))


@pytest.mark.parametrize("variant,layer,tokens", [("plain", 2, "all"), ("registers", 4, "all"),
                                                   ("no_cls_avg", 1, "all"), ("reg_no_cls", 3, "patches"),
                                                   ("plain", 5, "patches")])
def test_loss_equals_the_oracle_cosine_and_is_one_at_zero(variant, layer, tokens):
    model = source(variant)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    x2 = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    g = dta.layer_features(ctx_of(model), layer, tokens)
    with torch.no_grad():
        expected_n = 64 + (0 if tokens == "patches" else model.num_prefix_tokens)
        assert g(x).shape == (3, expected_n, 64)
        loss = dta.algo.cosine(g(x2), g(x)).mean()
        torch.testing.assert_close(loss, oracle_loss(model, x2, x, layer, tokens), atol=1e-5, rtol=0)
        assert loss < 0.999, "the case must move the features"
        assert abs(dta.algo.cosine(g(x), g(x)).mean().item() - 1) < 1e-6


def test_attack_stays_in_the_pixel_ball_and_lowers_the_layer_cosine_below_its_start():
    model = source()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    eps = 8 / 255
    start = vk.attack(model, x, method="dta", layer=3, eps=eps, steps=0, seed=5).images  # the random start only
    adv = vk.attack(model, x, method="dta", layer=3, eps=eps, steps=8, seed=5).images
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        at_start, after = oracle_loss(model, start, x, 3, "all"), oracle_loss(model, adv, x, 3, "all")
    # a random ViT's features barely move under 8/255; the attack moves them 3x further than the start does
    assert 1 - after > 3 * (1 - at_start), f"layer-3 cosine {after:.4f} after 8 steps, {at_start:.4f} at the start"
    assert torch.equal(vk.attack(model, x, method="dta", layer=3, eps=0.0, steps=3).images, x), "ε = 0 is identity"


def test_source_is_never_updated_and_checkpointing_changes_nothing():
    model = source().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    adv = vk.attack(model, x, method="dta", layer=1, steps=3, seed=0).images
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(vk.attack(model, x, method="dta", layer=1, steps=3, seed=0).images, adv)


class Downstream(torch.nn.Module):
    """A downstream model that records whether it was ever called with gradients enabled."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.pretrained_cfg, self.num_classes = model.pretrained_cfg, model.num_classes

    def forward(self, x):
        self.calls.append(torch.is_grad_enabled())
        return self.model(x)


def test_crafting_needs_no_downstream_model_and_transfer_scores_it():
    model = source()
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    result = vk.attack(model, x, method="dta", layer=2, steps=2, seed=0)
    assert result.labels_from == "model"  # no labels: the source's own predictions
    down = Downstream(source(seed=7))
    down.model.head = torch.nn.Linear(64, 3)  # another task: 3 classes
    scored = result.transfer(down, labels=y)
    assert torch.equal(scored.images, result.images) and not any(down.calls)
    with torch.no_grad():
        norm = lambda t: (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)  # noqa: E731
        clean, adv = down.model(norm(x)).argmax(1), down.model(norm(result.images)).argmax(1)
    ok = clean == y
    assert scored.clean_accuracy == pytest.approx(ok.float().mean().item())
    if ok.any():
        assert scored.attack_success_rate == pytest.approx((adv[ok] != y[ok]).float().mean().item())
    with pytest.raises(ValueError, match="4 entries but there are 6 images"):
        result.transfer(down, labels=[0, 1, 2, 0])


def test_auto_layer_is_the_argmin_of_the_per_layer_curve(caplog):
    model = source()
    x = torch.rand(4, 3, 32, 32)
    layer, curve = dta.choose_layer(model, x, steps=2)
    assert len(curve) == 6 and curve[layer] == min(curve)
    with caplog.at_level("INFO", logger="vitkit"):
        vk.attack(model, x, method="dta", steps=1, probe=2)
    assert "layer='auto' chose block" in caplog.text


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(eps=-0.1), ValueError, "dta: `eps` must be >= 0"),
    (dict(layer=6), ValueError, "dta: `layer` 6 is out of range for a source with 6 blocks"),
    (dict(layer="first"), TypeError, "dta: `layer` must be"),
    (dict(targets=1), ValueError, "dta: the attack is untargeted"),
])
def test_bad_settings_are_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        vk.attack(source(), torch.rand(2, 3, 32, 32), method="dta", steps=1, **kwargs)


def test_a_source_without_vit_blocks_is_refused():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 10, 32)

        def forward(self, x):
            return self.conv(x).flatten(1)
    with pytest.raises(NotImplementedError, match="dta: needs a timm ViT"):
        vk.attack(Conv(), torch.rand(2, 3, 32, 32), method="dta", layer=0, mean=MEAN, std=STD)
