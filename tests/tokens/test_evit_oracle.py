"""EViT against an independent oracle: the blocks walked by hand in plain torch from the spec (A2), on the
model's own weights, compared per block and on logits where pruning changes the output; identity through the
registered path."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant


def attention(blk, x):
    """timm's Attention by hand; returns (output, A) with A (B, h, N, N) the attention probabilities."""
    B, N, C = x.shape
    a, h = blk.attn, blk.attn.num_heads
    q, k, v = F.linear(x, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    A = (a.q_norm(q) @ a.k_norm(k).transpose(-2, -1) / (C // h) ** 0.5).softmax(-1)
    return a.proj(a.norm((A @ v).transpose(1, 2).reshape(B, N, C))), A


def prune(x, A, keep_rate, P, fuse):
    """One image: x (N, C), A (h, N, N). Keep the top ceil(rho (N - P)) by head-mean class attention, in
    position order; append the class-attention-weighted sum of the dropped ones."""
    N = x.shape[0]
    a = A[:, 0].mean(0)  # class token at 0
    keep = math.ceil(keep_rate * (N - P))
    kept = sorted((a[P:].topk(keep).indices + P).tolist())
    dropped = [j for j in range(P, N) if j not in kept]
    parts = [x[:P], x[kept]] + ([(a[dropped, None] * x[dropped]).sum(0, keepdim=True)] if fuse else [])
    return torch.cat(parts)


def oracle(model, images, keep_rate, drop_loc, fuse=True):
    P, logits, layers = model.num_prefix_tokens, [], []
    for img in images:
        x, per_block = model.norm_pre(model._pos_embed(model.patch_embed(img[None]))), []
        for i, blk in enumerate(model.blocks):
            out, A = attention(blk, blk.norm1(x))
            x = x + blk.ls1(out)
            if i in drop_loc:
                x = prune(x[0], A[0], keep_rate, P, fuse)[None]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            per_block.append(x[0])
        logits.append(model.head(model.fc_norm(model.norm(x)[0, 0])))
        layers.append(per_block)
    return torch.stack(logits), layers


def spread(model):
    """Peaky class attention and O(1) logits, so the choice of kept tokens shows in the output."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(20.0)
    return model


CASES = [pytest.param(v, cfg, id=f"{v}-{cfg}") for v, cfg in [
    ("plain", dict(keep_rate=0.7)), ("registers", dict(keep_rate=0.6, drop_loc=(0, 2, 4))),
    ("qk_norm", dict(keep_rate=0.7)), ("layerscale", dict(keep_rate=0.5, drop_loc=(1, 2, 3))),
    ("plain", dict(keep_rate=0.5, fuse_token=False))]]


@pytest.mark.parametrize("name,cfg", CASES)
def test_matches_the_oracle(name, cfg, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "evit", **cfg)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(x.clone()), owner="probe")
    with torch.no_grad():
        got, plain = model(images), reference(images)
        expected, layers = oracle(reference, images, cfg["keep_rate"], cfg.get("drop_loc", (1, 3, 4)),
                                  cfg.get("fuse_token", True))
    gap = (plain - expected).abs().max().item()
    assert gap > 0.05, f"pruning barely changes the output ({gap:.2e}): the comparison would prove nothing"
    for block, x in enumerate(seen):
        for b in range(len(images)):
            torch.testing.assert_close(x[b], layers[b][block], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"block {block}, image {b}: {m}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain", "registers"])
def test_keep_rate_one_runs_the_registered_path_and_is_identity(name, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "evit", keep_rate=1.0)
    assert "evit" in vk.get_runner(model).owners(), "keep_rate=1 must register EViT (identity through its path)"
    assert len(model.blocks[1].attn.q_norm._forward_hooks) == 1  # the class-query tap of a drop_loc block
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- algorithm edge cases (mutation survivors)


@pytest.mark.parametrize("fuse,dropped_to", [(True, 4), (False, -1)])
def test_dropped_tokens_map_to_the_fused_token_or_nowhere(fuse, dropped_to):
    from vitkit.tokens import evit_algo

    kept, dropped = torch.tensor([[1, 4, 5]]), torch.tensor([[2, 3]])
    new = evit_algo.new_positions(kept, dropped, 1, 6, fuse)
    assert new.tolist() == [[0, 1, dropped_to, dropped_to, 2, 3]]
