"""GTP-ViT against an independent oracle: the blocks walked by hand in plain torch from the spec (A4), on the
model's own weights, one image at a time, compared per block and on logits where propagation changes the
output."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant


def attention(blk, x, bias):
    """timm's eager Attention by hand with an additive bias; returns (output, A) with A (B, h, N, N)."""
    B, N, C = x.shape
    a, h = blk.attn, blk.attn.num_heads
    q, k, v = F.linear(x, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    A = (a.q_norm(q) @ a.k_norm(k).transpose(-2, -1) / (C // h) ** 0.5 + bias).softmax(-1)
    return a.proj(a.norm((A @ v).transpose(1, 2).reshape(B, N, C))), A


def graph(patches, kind, num_neighbours, gw=8):
    """W = D^-1/2 G D^-1/2 over the patches (n, C): 8-neighbourhood on the grid OR k most cosine-similar."""
    n = patches.shape[0]
    G = torch.zeros(n, n)
    if kind in ("spatial", "mixed"):
        for i in range(n):
            for j in range(n):
                G[i, j] = float(i != j and abs(i // gw - j // gw) <= 1 and abs(i % gw - j % gw) <= 1)
    if kind in ("semantic", "mixed"):
        m = F.normalize(patches, dim=-1)
        sim = m @ m.T - 3 * torch.eye(n)  # never self
        for i in range(n):
            G[i, sim[i].topk(num_neighbours).indices] = 1.0
    d = G.sum(1)
    return G / (d[:, None] * d[None, :]).sqrt()


def oracle(model, images, num_prop, alpha, kind="mixed", token_scale=True):
    P, logits, layers = model.num_prefix_tokens, [], []
    for img in images:
        x, per_block = model.norm_pre(model._pos_embed(model.patch_embed(img[None]))), []
        W, alive, s = graph(x[0, P:], kind, 8), torch.arange(x.shape[1] - P), torch.ones(x.shape[1])
        for blk in model.blocks:
            out, A = attention(blk, blk.norm1(x), s.log() if token_scale else 0.0)
            x = (x + blk.ls1(out))[0]
            N, A = x.shape[0], A[0]
            g = (A.diagonal(dim1=-2, dim2=-1).amax(0) * A.sum(dim=1).amax(0))[P:]  # self x received attention
            low = g.argsort()[:min(num_prop, N - P - 1)]
            keep = torch.tensor([j for j in range(N - P) if j not in low.tolist()])
            w = W[alive[keep]][:, alive[low]]  # sub-indexed, never re-normalised
            x = torch.cat([x[:P], x[P + keep] + alpha * w @ x[P + low]])[None]
            s = torch.cat([s[:P], s[P + keep] + alpha * w @ s[P + low]])
            alive = alive[keep]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            per_block.append(x[0])
        x = model.norm(x)[0]
        pooled = x[0] if model.global_pool == "token" else (x[P:] * s[P:, None]).sum(0) / s[P:].sum()
        logits.append(model.head(model.fc_norm(pooled)))
        layers.append(per_block)
    return torch.stack(logits), layers


def spread(model):
    """Peaky attention and O(1) logits, so ranking and propagation show in the output."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(20.0)
    return model


CASES = [pytest.param(v, cfg, id=f"{v}-{cfg}") for v, cfg in [
    ("plain", dict(num_prop=6, alpha=0.5)), ("registers", dict(num_prop=5, alpha=0.3, graph="spatial")),
    ("no_cls_avg", dict(num_prop=6, alpha=0.5, graph="semantic")), ("qk_norm", dict(num_prop=8)),
    ("layerscale", dict(num_prop=6, alpha=0.4, token_scale=False))]]


@pytest.mark.parametrize("name,cfg", CASES)
def test_matches_the_oracle(name, cfg, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "gtp", **cfg)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(x.clone()), owner="probe")
    with torch.no_grad():
        got, plain = model(images), reference(images)
        expected, layers = oracle(reference, images, cfg["num_prop"], cfg.get("alpha", 0.1),
                                  cfg.get("graph", "mixed"), cfg.get("token_scale", True))
    gap = (plain - expected).abs().max().item()
    assert gap > 0.05, f"propagation barely changes the output ({gap:.2e}): the comparison would prove nothing"
    for block, x in enumerate(seen):
        for b in range(len(images)):
            torch.testing.assert_close(x[b], layers[b][block], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"block {block}, image {b}: {m}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
