"""Region attention (ViTGaze taps, spec E9): the attention from a box of patches to the scene equals the eager
softmax computed by hand from q and k, restricted to the box's rows and the patch columns, per head and block."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitkit as vk
from vitkit.explain.attention import fused_flags
from vitkit.explain.region import region_weights

from conftest import make_variant

P = 4  # patch size of the tiny variants


def attention_by_hand(model, x):
    """{block: (B, h, N, N)} eager softmax(q kᵀ / √d) walking timm's blocks, q/k from the block's own weights."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    out = {}
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        B, N, _ = t.shape
        qkv = F.linear(blk.norm1(t), attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, h, N, d)
        if isinstance(attn.q_norm, nn.LayerNorm):
            q = F.layer_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
            k = F.layer_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
        out[i] = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        t = blk(t)
    return out


def box_rows(box, grid):
    """Flat patch indices a pixel box (x0, y0, x1, y1; end exclusive) overlaps: [c·P, c·P + P) meets [x0, x1)."""
    x0, y0, x1, y1 = box
    return [r * grid[1] + c for r in range(grid[0]) for c in range(grid[1])
            if r * P < y1 and r * P + P > y0 and c * P < x1 and c * P + P > x0]


@pytest.mark.parametrize("name", ["registers", "reg_no_cls", "qk_norm"])
def test_region_attention_equals_eager_attention_restricted_to_the_region(name):
    model = make_variant(name, dynamic_img_size=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 48)  # 8x12 grid
    box = (6, 3, 17, 9)  # columns 1..4, rows 0..2
    with torch.no_grad():
        plain = model(x)
        ref = attention_by_hand(model, x)
    maps = vk.attention(model, x, layers=[1, -1])
    got = maps.region_attention(box)  # (B, 2·h, gh, gw): block 1's heads, then block 5's
    assert got.shape == (2, 8, 8, 12)
    rows = box_rows(box, (8, 12))
    assert len(rows) == 12
    p = model.num_prefix_tokens
    expected = torch.cat([ref[i][:, :, [p + j for j in rows], p:].mean(2) for i in (1, 5)], 1).reshape(2, 8, 8, 12)
    err = (got - expected).abs().max().item()
    assert err <= 1e-5, f"{name}: region attention vs hand-computed eager attention differ by {err:.2e}"
    assert torch.equal(maps.output, plain) and all(fused_flags(model)), "fused SDPA kept, forward untouched"


def test_single_patch_box_is_that_patch_row():
    model = make_variant("registers")
    x = torch.randn(1, 3, 32, 32)
    la = vk.attention(model, x, layers=[3])[3]
    got = la.region_attention((9, 13, 10, 14))  # pixel (9, 13) -> patch (3, 2)
    assert torch.allclose(got, la.attn[:, :, 5 + 3 * 8 + 2, 5:].reshape(1, 4, 8, 8))


def test_weights_sum_to_one_and_vanish_outside_the_box():
    score = torch.randn(2, 4, 6)
    w = region_weights((4, 0, 12, 8), (4, 6), (4, 4), batch=2, score=score)  # columns 1, 2; rows 0, 1
    inside = torch.zeros(4, 6, dtype=torch.bool)
    inside[0:2, 1:3] = True
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert (w[:, ~inside.flatten()] == 0).all()
    assert torch.allclose(w[:, inside.flatten()], score[:, inside].softmax(-1)), "softmax of the score over the box"
    uniform = region_weights((4, 0, 12, 8), (4, 6), (4, 4))
    assert torch.allclose(uniform[0, inside.flatten()], torch.full((4,), 0.25))


def test_patch_weight_region_is_the_weighted_mean_of_rows():
    model = make_variant("reg_no_cls")
    x = torch.randn(1, 3, 32, 32)
    la = vk.attention(model, x, layers=[0])[0]
    w = torch.zeros(8, 8)
    w[1, 1], w[6, 2] = 3.0, 1.0
    got = la.region_attention(w)
    a = la.attn[0, :, 4:, 4:]
    expected = (0.75 * a[:, 1 * 8 + 1] + 0.25 * a[:, 6 * 8 + 2]).reshape(1, 4, 8, 8)
    assert torch.allclose(got, expected, atol=1e-7)


@pytest.mark.parametrize("box,match", [((0, 0, 40, 8), "0 <= x0 < x1 <= 32"), ((4, 4, 4, 8), "x0 < x1"),
                                       ((1, 2, 3), "a box is")])
def test_bad_boxes_refused(box, match):
    model = make_variant("plain")
    maps = vk.attention(model, torch.randn(1, 3, 32, 32), layers=[0])
    with pytest.raises(ValueError, match=match):
        maps.region_attention(box)


def test_after_token_merging_each_patch_takes_its_token_row():
    """ToMe merges tokens: a patch's query row is its token's; the region map is the mean of its patches' rows
    (each read through `query_rows(('patch', r, c))`, another path through the source map)."""
    model = make_variant("registers")
    vk.accelerate(model, "tome", r=6)
    x = torch.randn(2, 3, 32, 32)
    la = vk.attention(model, x, layers=[5])[5]
    assert la.source is not None and la.attn.shape[-1] < 5 + 64
    box = (4, 8, 16, 20)  # rows 2..4, columns 1..3
    rows = [la.to_grid(la.query_rows(la.attn, ("patch", r, c))) for r in range(2, 5) for c in range(1, 4)]
    assert torch.allclose(la.region_attention(box), torch.stack(rows).mean(0), atol=1e-6)


def test_with_gradient_checkpointing():
    model = make_variant("qk_norm")
    x = torch.randn(1, 3, 32, 32)
    ref = vk.attention(model, x, layers=[2]).region_attention((0, 0, 8, 8))
    model.set_grad_checkpointing(True)
    model.train()  # no dropout in the tiny variants: training mode only turns timm's checkpointing on
    maps = vk.attention(model, x, layers=[2], grad=True)
    got = maps.region_attention((0, 0, 8, 8))
    assert torch.allclose(got, ref, atol=1e-6)
    got.sum().backward()  # gradients flow to the weights through the recomputed attention
    assert model.blocks[2].attn.qkv.weight.grad is not None
