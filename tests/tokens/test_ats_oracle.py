"""ATS against an independent oracle: the blocks walked by hand in plain torch from the spec (A3), on the
model's own weights, one image at a time, compared per block and on logits where sampling changes the output;
the no-ATS-blocks identity through the registered path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant


def attention(blk, x):
    """timm's Attention by hand; returns (output, A, v) with A (B, h, N, N) and v (B, h, N, d)."""
    B, N, C = x.shape
    a, h = blk.attn, blk.attn.num_heads
    q, k, v = F.linear(x, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    A = (a.q_norm(q) @ a.k_norm(k).transpose(-2, -1) / (C // h) ** 0.5).softmax(-1)
    return a.proj(a.norm((A @ v).transpose(1, 2).reshape(B, N, C))), A, v


def sample(x, A, v, K, P):
    """One image: S_j = (sum_h A_h[0, j]) ||V_j|| (heads concatenated), sorted CDF min-max normalised, K - 1
    evenly spaced y from min{c > 0} to 1, nearest c for each, de-duplicated, kept in position order."""
    S = A[:, 0, P:].sum(0) * v[:, P:].pow(2).sum(dim=(0, 2)).sqrt()
    S = S / S.sum()
    srt, order = S.sort()
    c = srt.cumsum(0)
    c = (c - c[0]) / (c[-1] - c[0])
    picked = {int(order[(c - y).abs().argmin()]) for y in torch.linspace(float(c[c > 0].min()), 1.0, K - 1)}
    return torch.cat([x[:P], x[sorted(j + P for j in picked)]])


def oracle(model, images, blocks, K=0):
    P, logits, layers = model.num_prefix_tokens, [], []
    for img in images:
        x, per_block = model.norm_pre(model._pos_embed(model.patch_embed(img[None]))), []
        K = K or x.shape[1]  # N_0
        for i, blk in enumerate(model.blocks):
            out, A, v = attention(blk, blk.norm1(x))
            x = x + blk.ls1(out)
            if i in blocks:
                x = sample(x[0], A[0], v[0], K, P)[None]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            per_block.append(x[0])
        logits.append(model.head(model.fc_norm(model.norm(x)[0, 0])))
        layers.append(per_block)
    return torch.stack(logits), layers


def spread(model):
    """Peaky class attention, uneven value norms and O(1) logits, so sampling is not degenerate."""
    torch.manual_seed(7)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
            blk.attn.qkv.weight[128:] *= torch.rand(64, 1) * 3  # value rows: norms differ per channel
        model.head.weight.mul_(20.0)
    return model


CASES = [pytest.param(v, cfg, id=f"{v}-{cfg}") for v, cfg in [
    ("plain", dict()), ("registers", dict(blocks=(0, 2, 4))), ("qk_norm", dict(num_samples=30)),
    ("layerscale", dict(blocks=(1, 3)))]]


@pytest.mark.parametrize("name,cfg", CASES)
def test_matches_the_oracle(name, cfg, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "ats", **cfg)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append((x.clone(), ctx.state.sizes)),
                             owner="probe")
    with torch.no_grad():
        got, plain = model(images), reference(images)
        expected, layers = oracle(reference, images, cfg.get("blocks", range(1, 6)), cfg.get("num_samples", 0))
    gap = (plain - expected).abs().max().item()
    assert gap > 0.05, f"sampling barely changes the output ({gap:.2e}): the comparison would prove nothing"
    counts = [[len(layers[b][i]) for i in range(6)] for b in range(len(images))]
    assert counts[0] != counts[1], f"kept counts should differ across images: {counts}"
    for block, (x, sizes) in enumerate(seen):
        for b in range(len(images)):
            n = x.shape[1] if sizes is None else int((sizes[b, :, 0] > 0).sum())  # real tokens, no padding
            assert n == len(layers[b][block]), f"block {block}, image {b}: {n} tokens, oracle {counts[b]}"
            torch.testing.assert_close(x[b, :n], layers[b][block], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"block {block}, image {b}: {m}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain", "registers"])
def test_no_ats_blocks_runs_the_registered_path_and_is_identity(name, images):
    model = spread(make_variant(name))
    reference = copy.deepcopy(model)
    vk.accelerate(model, "ats", blocks=())
    assert "ats" in vk.get_runner(model).owners(), "blocks=() must register ATS (identity through its path)"
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- algorithm edge cases (mutation survivors)


def test_significance_is_attention_times_value_norm_normalised():
    from vitkit.tokens import ats_algo

    torch.manual_seed(5)
    a, v = torch.rand(6) * 0.1, torch.rand(6, 8) * 0.1  # raw scores sum far below 1
    raw = a * v.pow(2).sum(1).sqrt()
    torch.testing.assert_close(ats_algo.significance(a, v), raw / raw.sum())


@pytest.mark.parametrize("n,K,expected", [(0, 65, 0), (1, 65, 1), (5, 2, 1)])
def test_sampling_edge_cases(n, K, expected):
    from vitkit.tokens import ats_algo

    torch.manual_seed(6)
    picked = ats_algo.inverse_transform_sample(torch.rand(n).softmax(0), K)
    assert picked.dtype == torch.long and picked.shape == (expected,), picked
