"""MAE objective: untouched wrapping, the mask (count, prefix tokens), and the loss against a plain-torch oracle."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from tests.conftest import VARIANTS, make_variant
from vitkit.pretrain import mae


def build(name="plain", **cfg):
    model = make_variant(name)
    return model, mae.Objective(model, mae.Config(**cfg))


# --- identity: wrapping changes nothing ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_wrapping_leaves_the_state_dict_unchanged(name):
    model = make_variant(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = mae.Objective(model, mae.Config())
    after = obj.backbone.state_dict()
    assert obj.backbone is model and list(after) == list(before)
    worst = max((after[k] - before[k]).abs().max().item() for k in before)
    assert worst == 0, f"wrapping moved a tensor by {worst}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # unmasked, lightly's encoder gives the model's own tokens
        torch.testing.assert_close(obj.encoder.encode(x), model.forward_features(x), rtol=0, atol=1e-6)


# --- structure: the mask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_patches,ratio", [(64, 0.75), (49, 0.75), (6, 0.75), (10, 0.75), (64, 0.6)])
def test_masked_count_is_round_of_ratio_times_patches(num_patches, ratio):
    keep, masked = mae.algo.random_patch_mask(3, num_patches, 5, ratio)
    expected = math.floor(ratio * num_patches + 0.5)  # round(0.75·N), halves up
    assert masked.shape == (3, expected), f"masked {masked.shape[1]}, expected {expected}"
    for k, m in zip(keep, masked):  # a partition of all tokens; prefix tokens 0..4 kept
        assert sorted(torch.cat([k, m]).tolist()) == list(range(5 + num_patches))
        assert k[:5].tolist() == list(range(5)) and m.min() >= 5


@pytest.mark.parametrize("name", ["plain", "registers", "reg_no_cls", "no_cls_avg"])
def test_class_and_register_tokens_are_never_masked(name):
    model, obj = build(name)
    prefix = model.num_prefix_tokens
    torch.manual_seed(0)
    for _ in range(20):
        keep, masked = obj.sample_mask(4)
        assert (masked >= prefix).all(), "a prefix token was masked"
        assert (keep[:, :prefix] == torch.arange(prefix)).all(), "a prefix token was dropped"
        assert masked.shape[1] == 48  # round(0.75 · 64)


# --- behaviour: the loss ---------------------------------------------------------------------------------------
def test_editing_visible_patch_targets_leaves_the_loss_unchanged():
    model, obj = build("registers")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    keep, masked = obj.sample_mask(2)
    base = obj.loss(images, images, keep, masked)
    grid, p, prefix = 8, 4, model.num_prefix_tokens

    def edit(index):  # add noise to the pixels of one patch of image 0 (in the target only)
        t = images.clone()
        r, c = divmod(int(index) - prefix, grid)
        t[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn(3, p, p)
        return t

    for index in keep[0, prefix:]:
        assert obj.loss(images, edit(index), keep, masked) == base, f"visible patch {int(index)} changed the loss"
    assert obj.loss(images, edit(masked[0, 0]), keep, masked) != base, "a masked patch's target is ignored"


def oracle_mae_loss(vit, dec_embed, dec, dec_pred, images, keep, masked, patch=4):
    """MAE from the spec, in plain torch on the modules' weights: encoder on visible patches + prefix tokens,
    decoder on visible encodings + mask tokens, MSE on masked patches against per-patch normalised pixels."""
    b = images.shape[0]
    x = vit.patch_embed(images)  # (B, N, D)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + vit.pos_embed], 1)
    else:
        x = torch.cat(prefix + [x], 1) + vit.pos_embed
    x = torch.stack([x[i, keep[i]] for i in range(b)])  # visible tokens (prefix first)
    for block in vit.blocks:
        x = block(x)
    x = dec_embed(vit.norm(x))
    full = dec.mask_token.expand(b, keep.shape[1] + masked.shape[1], -1).clone()
    for i in range(b):
        full[i, keep[i]] = x[i]
    full = full + dec.pos_embed
    for block in dec.blocks:
        full = block(full)
    pred = dec_pred(dec.norm(full))
    pred = torch.stack([pred[i, masked[i]] for i in range(b)])
    c, h, w = images.shape[1:]
    patches = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(b, -1, patch * patch * c)
    n_prefix = keep.shape[1] + masked.shape[1] - patches.shape[1]
    target = torch.stack([patches[i, masked[i] - n_prefix] for i in range(b)])
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize("name", ["plain", "registers", "reg_no_cls"])
def test_loss_matches_the_oracle(name):
    model, obj = build(name)
    torch.manual_seed(0)
    with torch.no_grad():
        obj.decoder.mask_token.normal_()  # a mask token that matters
    images = torch.randn(2, 3, 32, 32) * torch.linspace(0.2, 2, 32)  # patches of different scale
    keep, masked = obj.sample_mask(2)
    got = obj.loss(images, images, keep, masked)
    want = oracle_mae_loss(model, obj.decoder_embed, obj.decoder, obj.decoder_pred, images, keep, masked)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- variants: every conformance model trains, or is refused -------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_the_backbone_on_every_variant(name):
    model, obj = build(name)
    loss, _ = obj(torch.randn(2, 3, 32, 32))
    loss.backward()
    for key in ("blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "reg_token"):
        p = dict(model.named_parameters()).get(key)
        if p is not None and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient on {key}"


def test_refuses_what_it_cannot_train():
    with pytest.raises(NotImplementedError, match="mae: needs a square patch grid"):
        mae.Objective(make_variant("plain", img_size=(32, 48)), mae.Config())
    tome = vk.accelerate(make_variant("plain"), "tome", r=2)
    with pytest.raises(NotImplementedError, match="mae: the model has token-sequence methods"):
        mae.Objective(tome, mae.Config())
    with pytest.raises(NotImplementedError, match="mae: needs a timm VisionTransformer"):
        mae.Objective(torch.nn.Linear(2, 2), mae.Config())
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.Config(mask_ratio=1.0)
    with pytest.raises(ValueError, match="masks 0 of 4 patches"):
        mae.algo.random_patch_mask(1, 4, 1, 0.1)
