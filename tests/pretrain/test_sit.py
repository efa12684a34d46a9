"""SiT objective against plain-torch oracles: patch-aligned corruption at the configured fraction, prefix tokens
never corrupted, L1 on corrupted patches only, NT-Xent against the momentum teacher, no gradient to the teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import VARIANTS, make_variant
from vitkit.pretrain import sit
from vitkit.pretrain import sit_algo as algo

SMALL = dict(proj_dim=16, hidden_dim=32)
P = 4  # the tiny models' patch size (32 px, 8x8 grid)


def build(name="plain", **cfg):
    torch.manual_seed(0)
    model = make_variant(name)
    return model, sit.Objective(model, sit.Config(**{**SMALL, **cfg}))


@pytest.mark.parametrize("frac", [0.5, 0.3, 0.8])
def test_corruption_is_patch_aligned_at_the_fraction(frac):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    mask = algo.block_mask(6, (8, 8), frac, max_block=3, generator=g)
    out = algo.corrupt(x, mask, (P, P), replace_frac=0.3, generator=g)
    changed = (out != x).any(1)  # (B, H, W) pixels that moved
    per_patch = changed.reshape(6, 8, P, 8, P).float().mean((2, 4))  # share of each patch's pixels changed
    assert set(per_patch.unique().tolist()) <= {0.0, 1.0}, "a patch is partly corrupted"
    assert torch.equal(per_patch.bool(), mask), "corrupted pixels are not the masked patches"
    assert (mask.flatten(1).sum(1) == int(frac * 64 + 0.5)).all(), mask.flatten(1).sum(1)


def test_a_third_of_corrupted_patches_come_from_the_partner():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    mask = algo.block_mask(8, (8, 8), 0.5, max_block=4, generator=g)
    out = algo.corrupt(x, mask, (P, P), replace_frac=0.3, generator=g)
    from_partner = (out == x.flip(0)).all(1).reshape(8, 8, P, 8, P).all(4).all(2)
    share = (from_partner & mask).sum() / mask.sum()
    assert abs(share.item() - 0.3) < 0.07, share


def test_prefix_tokens_are_never_corrupted():
    model, obj = build("registers")
    x = torch.randn(2, 3, 32, 32)
    mask = algo.block_mask(2, (8, 8), 0.5, 4)
    clean = model._pos_embed(model.patch_embed(x))
    dirty = model._pos_embed(model.patch_embed(algo.corrupt(x, mask, (P, P), 0.3)))
    p = model.num_prefix_tokens
    torch.testing.assert_close(dirty[:, :p], clean[:, :p], rtol=0, atol=0)  # class + 4 registers untouched
    changed = (dirty[:, p:] != clean[:, p:]).any(-1)  # (B, 64) patch tokens that moved
    assert torch.equal(changed, mask.flatten(1))


def oracle_ntxent(a, b, tau):
    """SimCLR's NT-Xent over 2B anchors: positive pairs (a_i, b_i), every other embedding a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / tau
    n = a.shape[0]
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, pos)


def oracle_loss(model, obj, corrupted, clean, mask, lam, tau):
    """contrast + λ·recon by hand: patch tokens -> Linear -> per-patch L1 on corrupted patches; pooled -> head."""
    recon, z = [], []
    p = model.num_prefix_tokens
    for v in range(2):
        tokens = model.forward_features(corrupted[v])
        pred = obj.recon_head(tokens[:, p:])  # (B, 64, P·P·3), patch (r, c) at r·8 + c, pixels (row, col, chan)
        errs = []
        for b in range(clean.shape[1]):
            for r in range(8):
                for c in range(8):
                    if mask[v, b, r, c]:
                        target = clean[v, b, :, P * r:P * r + P, P * c:P * c + P].permute(1, 2, 0).flatten()
                        errs.append((pred[b, r * 8 + c] - target).abs().mean())
        recon.append(torch.stack(errs).mean())
        z.append(obj.head(model.forward_head(tokens, pre_logits=True)))
    t = [obj.teacher_head(obj.teacher.forward_head(obj.teacher.forward_features(clean[v]), pre_logits=True))
         for v in range(2)]
    contrast = (oracle_ntxent(z[0], t[1], tau) + oracle_ntxent(z[1], t[0], tau)) / 2
    return contrast + lam * (recon[0] + recon[1]) / 2


@pytest.mark.parametrize("name", ["plain", "registers", "no_cls_avg"])
def test_loss_matches_the_oracle(name):
    model, obj = build(name, recon_weight=2.5, temperature=0.3)
    with torch.no_grad():  # teacher != student, so a swapped branch shows
        for p in obj.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clean = torch.randn(2, 3, 3, 32, 32)
    mask = algo.block_mask(6, (8, 8), 0.5, 4).view(2, 3, 8, 8)
    corrupted = torch.stack([algo.corrupt(clean[v], mask[v], (P, P), 0.3) for v in range(2)])
    loss, stats = obj.loss(corrupted, clean, mask)
    with torch.no_grad():
        expected = oracle_loss(model, obj, corrupted, clean, mask, 2.5, 0.3)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert stats["recon"] > 0 and stats["contrast"] > 0


def test_editing_uncorrupted_target_pixels_leaves_recon_unchanged():
    model, obj = build()
    clean = torch.randn(2, 2, 3, 32, 32)
    mask = algo.block_mask(4, (8, 8), 0.5, 4).view(2, 2, 8, 8)
    corrupted = torch.stack([algo.corrupt(clean[v], mask[v], (P, P), 0.3) for v in range(2)])
    edited = clean + 5.0 * (~algo.pixel_mask(mask.flatten(0, 1), (P, P))).float().view(2, 2, 1, 32, 32)
    with torch.no_grad():
        base = obj.loss(corrupted, clean, mask)[1]["recon"]
        assert obj.loss(corrupted, edited, mask)[1]["recon"] == pytest.approx(base, abs=1e-6)
        inside = clean + 5.0 * algo.pixel_mask(mask.flatten(0, 1), (P, P)).float().view(2, 2, 1, 32, 32)
        assert obj.loss(corrupted, inside, mask)[1]["recon"] > base + 1  # the corrupted pixels do count


def test_no_gradient_reaches_the_teacher_and_ema_is_exact():
    model, obj = build(momentum=0.9)
    loss, _ = obj(torch.randn(3, 2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in [*obj.teacher.parameters(),
                                                                 *obj.teacher_head.parameters()])
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and obj.recon_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in obj.teacher.named_parameters()}
    obj.after_step(3, 9)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 2 / 8) + 1) / 2
    student = dict(model.named_parameters())
    for k, p in obj.teacher.named_parameters():
        torch.testing.assert_close(p, m * before[k] + (1 - m) * student[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_a_step(name):
    model, obj = build(name)
    loss, _ = obj(torch.randn(2, 2, 3, 32, 32))
    loss.backward()
    assert math.isfinite(loss.item())
