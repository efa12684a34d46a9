"""Locality alignment (explain.md E8): mask sampler statistics, the skip-blocks teacher and the whole loss against
plain-torch oracles, zero-init head, target scaling, and the locality metric on constructed features of known
accuracy."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.distill import locality_align_algo as algo
from vitkit.distill.base import Teacher
from vitkit.distill.locality_align import DistillConfig, LocalityLoss

NORM = ((0.5,) * 3, (0.5,) * 3)


def test_mask_sampler():
    masks = algo.sample_masks(3000, 196, torch.Generator().manual_seed(0))
    m, comp, ones = masks.split(3000)
    assert torch.equal(comp, 1 - m) and torch.equal(ones, torch.ones_like(ones))
    ratio = m.mean(1)
    assert abs(ratio.mean().item() - 0.5) < 0.02 and abs(ratio.std().item() - 0.289) < 0.02


def walk(model, x, upto):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:upto]:
        t = blk(t)
    return model.norm(t)


def test_loss_against_oracle_and_zero_init_head():
    teacher = make_variant("registers")
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    mod = LocalityLoss(DistillConfig(), Teacher(teacher, NORM), student, x[:2])
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():  # zero-initialised head: the step-0 reconstruction does not depend on the image
        masks = algo.sample_masks(2, 64, torch.Generator().manual_seed(3))
        r1, r2 = mod.reconstruct(student, x[:2], masks), mod.reconstruct(student, x[2:], masks)
        torch.testing.assert_close(r1, r2)
        for p in student.norm.proj.parameters():
            p.normal_(0, 0.1)  # now make the student matter
    step = mod(student, Teacher(teacher, NORM), x, None)
    # oracle: same seeded masks, teacher walked by hand (L-1 blocks + norm) on zeroed patches, scale from the batch
    g = torch.Generator().manual_seed(0)
    u0, u = torch.rand(4, 1, generator=g), torch.rand(4, 64, generator=g)
    m = (u > u0).float()
    masks = torch.cat([m, 1 - m, torch.ones_like(m)])
    pix = masks.reshape(12, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        target = walk(teacher, x.repeat(3, 1, 1, 1) * pix, len(teacher.blocks) - 1)
    scale = 1 / ((target - target.mean(0)) ** 2).mean().sqrt()
    tokens = student.norm.proj(student.norm.base_layer(walk_raw(student, x))).repeat(3, 1, 1)
    keep = torch.cat([torch.zeros(12, 5), masks], 1)
    want = F.mse_loss(mod.decoder(tokens * keep[..., None]), target * scale)
    torch.testing.assert_close(step.loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.scale, scale)
    predict_mean = F.mse_loss((target.mean(0, keepdim=True) * scale).expand_as(target), target * scale)
    assert predict_mean.item() == pytest.approx(1.0, abs=1e-5)


def walk_raw(model, x):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks:
        t = blk(t)
    return t


def test_trains_and_saves(tmp_path):
    teacher = make_variant("plain")
    student = copy.deepcopy(teacher)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    vk.distill(teacher, student, data, method="locality-align", epochs=1, batch_size=4, out_dir=tmp_path,
               progress=False)
    assert [a.name for a in vk.applied(student)] == ["locality-align"]
    loaded = vk.load(tmp_path / "model").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), student.eval().forward_features(x))


def test_mosaic_labels_and_locality_metric_known_values():
    images, labels = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 4, 4), torch.arange(8)
    mosaic, per_patch = algo.mosaics(images, labels, (4, 4))
    assert mosaic.shape == (2, 3, 8, 8) and mosaic[1, 0, 5, 1].item() == 6.0  # bottom-left of the 2nd mosaic
    assert per_patch[1].tolist() == [[4, 4, 5, 5], [4, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]
    torch.manual_seed(0)
    y_train, y_test = torch.arange(80) % 4, torch.arange(40) % 4
    onehot = lambda y: F.one_hot(y, 4).double() + 0.05 * torch.randn(len(y), 4, dtype=torch.float64)  # noqa: E731
    assert algo.patch_probe_accuracy(onehot(y_train), y_train, onehot(y_test), y_test) == 1.0
    constant = lambda y: torch.ones(len(y), 4)  # noqa: E731 - no information: one class for all, 1/4 right
    assert algo.patch_probe_accuracy(constant(y_train), y_train, constant(y_test), y_test) == 0.25
