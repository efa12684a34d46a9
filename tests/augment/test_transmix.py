"""TransMix against plain-torch oracles (spec ../shared/methods/augment-pretrain.md, D1): the CutMix box is read
back from the pixels, the class attention of the last block is recomputed by walking the blocks by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.augment import mix_batch
from vitkit.augment import transmix_algo as algo

K = 10


def batch(seed=0, size=(32, 32), B=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, *size, generator=g), torch.tensor([0, 1, 2, 3][:B])


def run(model, x, y, seed=0):
    np.random.seed(seed)
    torch.manual_seed(seed)
    mix = mix_batch(model, x, y)
    with torch.no_grad(), mix.forward():
        model(mix.images)
    return mix, mix.target(K)


def pasted_box(x, mixed):
    """Oracle: the (H, W) region where the pixels came from the flipped batch."""
    from_partner = (mixed == x.flip(0)).all(1).all(0) & (x != x.flip(0)).any(1).all(0)
    rows, cols = torch.nonzero(from_partner, as_tuple=True)
    box = (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1)
    expected = x.clone()
    expected[:, :, box[0]:box[1], box[2]:box[3]] = x.flip(0)[:, :, box[0]:box[1], box[2]:box[3]]
    torch.testing.assert_close(mixed, expected, atol=0, rtol=0)  # a box, all of it from the partner
    return box


def cls_attention_by_hand(model, img):
    """Oracle: last block's class-token attention to the patches (mean over heads), walking timm's modules."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    for blk in model.blocks[:-1]:
        x = blk(x)
    blk = model.blocks[-1]
    B, N, C = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1])
    a = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(-1).mean(1)  # (B, N, N)
    return a[:, 0, model.num_prefix_tokens:]  # class token first in timm


def soft(y, lam):
    one = F.one_hot(y, K).float()
    lam = torch.as_tensor(lam, dtype=torch.float32).reshape(-1, 1)
    return (1 - lam) * one + lam * one.flip(0)


def test_uniform_attention_equals_cutmix():
    model = make_variant("plain")
    with torch.no_grad():  # q = k = 0 in the last block: every attention row is uniform
        model.blocks[-1].attn.qkv.weight[:2 * 64].zero_()
        model.blocks[-1].attn.qkv.bias[:2 * 64].zero_()
    vk.augment(model, "transmix", mixup_alpha=0.0, box_mode="coverage")
    x, y = batch()
    mix, target = run(model, x, y)
    yl, yh, xl, xh = pasted_box(x, mix.images)
    area = (yh - yl) * (xh - xl) / (32 * 32)
    assert 0 < area < 1
    torch.testing.assert_close(target, soft(y, area))
    torch.testing.assert_close(target.sum(1), torch.ones(4))


@pytest.mark.parametrize("variant,size,mode", [("plain", (32, 32), "nearest"), ("registers", (32, 32), "nearest"),
                                               ("plain", (32, 48), "nearest"), ("plain", (32, 32), "coverage")])
def test_label_is_mean_of_area_and_attention_in_box(variant, size, mode):
    model = make_variant(variant, dynamic_img_size=True)
    with torch.no_grad():  # sharpen the attention so the box's share differs from its area
        model.blocks[-1].attn.qkv.weight[:2 * 64].mul_(4)
    vk.augment(model, "transmix", mixup_alpha=0.0, box_mode=mode)
    x, y = batch(1, size)
    mix, target = run(model, x, y, seed=3)
    yl, yh, xl, xh = pasted_box(x, mix.images)
    H, W = size
    gh, gw = H // 4, W // 4
    with torch.no_grad():
        a = cls_attention_by_hand(model, mix.images).reshape(-1, gh, gw)
    inside = torch.zeros(gh, gw)
    for r in range(gh):
        for c in range(gw):
            if mode == "nearest":  # the patch's top-left pixel
                inside[r, c] = float(yl <= 4 * r < yh and xl <= 4 * c < xh)
            else:
                inside[r, c] = (max(0, min(4 * r + 4, yh) - max(4 * r, yl)) *
                                max(0, min(4 * c + 4, xh) - max(4 * c, xl))) / 16
    area = (yh - yl) * (xh - xl) / (H * W)
    lam = (area + (a * inside).sum((1, 2)) / a.sum((1, 2))) / 2
    assert (lam - area).abs().max() > 1e-3, "degenerate case: attention share equals the area"
    torch.testing.assert_close(target, soft(y, lam), atol=1e-5, rtol=1e-5)


def test_attention_read_keeps_fused_sdpa_and_the_logits():
    from vitkit.explain.attention import fused_flags

    model = vk.augment(make_variant("qk_norm"), "transmix", mixup_alpha=0.0)
    x, y = batch()
    mix = mix_batch(model, x, y)
    with torch.no_grad():
        plain = model(mix.images)
        with mix.forward():
            hooked = model(mix.images)
    assert all(fused_flags(model)) and torch.equal(plain, hooked)
    assert mix.target(K).shape == (4, K)


def test_mixup_batch_keeps_standard_targets():
    model = vk.augment(make_variant("plain"), "transmix", cutmix_alpha=0.0)
    x, y = batch()
    mix, target = run(model, x, y)
    lam = ((mix.images - x) / (x.flip(0) - x)).median().item()  # oracle: partner share from the pixels
    torch.testing.assert_close(mix.images, (1 - lam) * x + lam * x.flip(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target, soft(y, lam), atol=1e-5, rtol=1e-5)


def test_all_attention_in_box_and_full_box():
    attn = torch.zeros(2, 4, 4)
    attn[:, 1, 2] = 1.0
    box = algo.box_on_grid((4, 8, 8, 12), (16, 16), (4, 4))  # covers cell (1, 2)
    assert box.sum() == 1 and box[1, 2] == 1
    torch.testing.assert_close(algo.attention_lambda(attn, box, 1 / 16), torch.full((2,), (1 / 16 + 1) / 2))
    y = F.one_hot(torch.tensor([0, 1]), K).float()
    full = algo.box_on_grid((0, 16, 0, 16), (16, 16), (4, 4))
    torch.testing.assert_close(algo.mix_targets(y, algo.attention_lambda(torch.rand(2, 4, 4), full, 1.0)), y.flip(0))


def test_probability_zero_and_refusals():
    model = vk.augment(make_variant("plain"), "transmix", prob=0.0)
    x, y = batch()
    mix, target = run(model, x, y)
    assert torch.equal(mix.images, x) and torch.equal(target, y)
    with pytest.raises(NotImplementedError, match="transmix: needs a class token"):
        vk.augment(make_variant("no_cls_avg"), "transmix")
    with pytest.raises(ValueError, match="transmix: `prob`"):
        vk.augment(make_variant("plain"), "transmix", prob=1.5)
    merged = vk.accelerate(vk.augment(make_variant("plain"), "transmix", mixup_alpha=0.0), "tome", r=4)
    with pytest.raises(NotImplementedError, match="token reduction"):
        run(merged, x, y)


def test_fit_runs_with_transmix_and_checkpointing(tmp_path):
    model = vk.adapt(make_variant("registers"), "full")
    model.set_grad_checkpointing(True)
    vk.augment(model, "transmix")
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % K)
    result = vk.fit(model, data, epochs=1, batch_size=8, lr=1e-3, out_dir=tmp_path, progress=False,
                    save_model=False)
    assert np.isfinite(result.history[-1]["train_loss"])
