"""ToMe against an independent oracle: the blocks walked by hand in plain torch from the spec (A1), on the
model's own weights, compared per block and on logits where merging changes the output; identity through the
registered path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant


def attention(blk, x, bias=None):
    """timm's Attention by hand (q, k after q_norm / k_norm); returns (output, k) with k (B, h, N, d)."""
    B, N, C = x.shape
    a, h = blk.attn, blk.attn.num_heads
    q, k, v = F.linear(x, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    logits = q @ k.transpose(-2, -1) / (C // h) ** 0.5 + (0 if bias is None else bias)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return a.proj(a.norm(o)), k


def merge(x, s, metric, r, P):
    """One image: x (N, C), s (N,), metric (N, d). Alternate split, cosine, top-r, size-weighted scatter."""
    N = x.shape[0]
    r = min(r, (N - P) // 2)
    m = F.normalize(metric, dim=-1)
    a_pos = [i for i in range(P, N) if i % 2 == 0]
    b_pos = [i for i in range(P, N) if i % 2 == 1]
    best, partner = (m[a_pos] @ m[b_pos].T).max(dim=1)
    gone = set(best.topk(r).indices.tolist()) if r > 0 else set()
    num, den = x[b_pos] * s[b_pos, None], s[b_pos].clone()
    for i in gone:
        num[partner[i]] += s[a_pos[i]] * x[a_pos[i]]
        den[partner[i]] += s[a_pos[i]]
    kept = [a_pos[i] for i in range(len(a_pos)) if i not in gone]
    return torch.cat([x[:P], x[kept], num / den[:, None]]), torch.cat([s[:P], s[kept], den])


def oracle(model, images, r, prop_attn=True):
    """Per image: embed, walk the blocks (merge between attention and MLP, log-size bias), pool, head."""
    P, logits, layers = model.num_prefix_tokens, [], []
    for img in images:
        x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))
        s, per_block = torch.ones(x.shape[1]), []
        for blk in model.blocks:
            out, k = attention(blk, blk.norm1(x), s.log()[None, None, None] if prop_attn else None)
            x = x + blk.ls1(out)
            x, s = merge(x[0], s, k[0].mean(0), r, P)
            x = x[None] + blk.ls2(blk.mlp(blk.norm2(x[None])))
            per_block.append(x[0])
        x = model.norm(x)[0]
        pooled = x[0] if model.global_pool == "token" else (x[P:] * s[P:, None]).sum(0) / s[P:].sum()
        logits.append(model.head(model.fc_norm(pooled)))
        layers.append(per_block)
    return torch.stack(logits), layers


def spread(model):
    """Peaky attention and O(1) logits, so merge choices matter and show in the output."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(20.0)
    return model


CASES = [pytest.param(v, cfg, id=f"{v}-{cfg}") for v, cfg in [
    ("plain", dict(r=8)), ("registers", dict(r=6)), ("qk_norm", dict(r=8)), ("layerscale", dict(r=8)),
    ("no_cls_avg", dict(r=10)), ("plain", dict(r=8, prop_attn=False))]]


@pytest.mark.parametrize("name,cfg", CASES)
def test_matches_the_oracle(name, cfg, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "tome", **cfg)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(x.clone()), owner="probe")
    with torch.no_grad():
        got, plain = model(images), reference(images)
        expected, layers = oracle(reference, images, cfg["r"], cfg.get("prop_attn", True))
    gap = (plain - expected).abs().max().item()
    assert gap > 0.05, f"merging barely changes the output ({gap:.2e}): the comparison would prove nothing"
    for block, x in enumerate(seen):
        for b in range(len(images)):
            torch.testing.assert_close(x[b], layers[b][block], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"block {block}, image {b}: {m}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain", "registers", "no_cls_avg"])
def test_r0_runs_the_registered_path_and_is_identity(name, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "tome", r=0)
    assert "tome" in vk.get_runner(model).owners(), "r=0 must register ToMe (identity through its own path)"
    taps = []
    model.blocks[0].attn.k_norm.register_forward_hook(lambda m, a, out: taps.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
    assert taps and len(model.blocks[0].attn.k_norm._forward_hooks) == 2  # ToMe's key tap + this probe
