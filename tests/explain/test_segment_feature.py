"""`vk.segment(..., feature="x"|"q"|"k"|"v")` against an oracle that computes each block's tokens by hand from the
model's weights (spec E5: the choice of tokens the similarity uses), on register / no-class-token / qk-norm models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitkit as vk

from conftest import make_variant

LAYER = 2  # an inner block: the final norm on an intermediate output, and q/k/v of a block that is not the last


def tokens_by_hand(model, x, layer, feature):
    """(N, C) tokens of `layer` for one image: timm's embedding, blocks walked, q/k/v = norm1(x) W_qkvᵀ + b split
    per head, q/k layer-normed per head when the model has qk-norm; 'x' = final norm of the block's output."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:layer]:
        t = blk(t)
    blk = model.blocks[layer]
    if feature == "x":
        return model.norm(blk(t))[0]
    attn = blk.attn
    qkv = F.linear(blk.norm1(t), attn.qkv.weight, attn.qkv.bias)[0]  # (N, 3·C)
    N, h = qkv.shape[0], attn.num_heads
    q, k, v = qkv.reshape(N, 3, h, -1).unbind(1)  # (N, h, d) each
    if isinstance(attn.q_norm, nn.LayerNorm):
        q = F.layer_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
        k = F.layer_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    return {"q": q, "k": k, "v": v}[feature].reshape(N, -1)


def oracle_similarity(model, x, layer, feature, row, col, grid):
    f = tokens_by_hand(model, x, layer, feature)[model.num_prefix_tokens:]  # patches only
    f = F.normalize(f, dim=-1)
    return (f @ f[row * grid[1] + col]).reshape(grid)


CASES = [pytest.param(v, f, id=f"{v}-{f}") for v in ("registers", "reg_no_cls", "qk_norm") for f in "xqkv"]


@pytest.mark.parametrize("name,feature", CASES)
def test_feature_similarity_matches_hand_computed_tokens(name, feature):
    model = make_variant(name, dynamic_img_size=True)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 48)  # non-square: 8x12 grid
    seg = vk.segment(model, x, point=(21, 9), layer=LAYER, feature=feature, threshold=0.5)
    assert seg.patch == (2, 5)
    with torch.no_grad():
        ref = oracle_similarity(model, x, LAYER, feature, 2, 5, (8, 12))
    got = torch.from_numpy(seg.patch_similarity)
    err = (got - ref).abs().max().item()
    assert err <= 1e-5, f"{name}/{feature}: similarity differs from the hand-computed one by {err:.2e}"


def test_the_choice_changes_the_map():
    """q, k, v and x maps differ on a random model, so a swapped choice would fail the oracle test above."""
    model = make_variant("registers")
    x = torch.randn(1, 3, 32, 32)
    sims = {f: torch.from_numpy(vk.segment(model, x, point=(9, 9), feature=f).patch_similarity) for f in "xqkv"}
    for a in "xqkv":
        for b in "xqkv":
            if a < b:
                assert (sims[a] - sims[b]).abs().max() > 0.05, f"{a} and {b} give the same map"


def test_merged_tokens_share_their_features():
    model = make_variant("registers")
    vk.accelerate(model, "tome", r=8)
    x = torch.randn(2, 3, 32, 32)
    from vitkit.explain.segment import token_features

    k = token_features(model, x, -1, "k").flatten(2)  # (B, C, 64): merged tokens copied to their patches
    assert k.shape == (2, 64, 64)
    same = (F.normalize(k, dim=1).transpose(1, 2) @ F.normalize(k, dim=1)) > 1 - 1e-6
    assert same.sum() > 2 * 64, "after ToMe some patches share one token's key"


def test_bad_feature_and_both_extractors_refused():
    model = make_variant("plain")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="`feature` must be one of x, q, k, v"):
        vk.segment(model, x, point=(1, 1), feature="keys")
    with pytest.raises(ValueError, match="either `features`"):
        vk.segment(model, x, point=(1, 1), feature="k", features=lambda t: F.avg_pool2d(t, 4))


def test_similarity_overlap_on_keys_matches_hand_computed_keys():
    model = make_variant("reg_no_cls")
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1  # two objects: left and right halves
    got = vk.similarity_overlap(model, x, labels, layer=LAYER, feature="k")
    with torch.no_grad():
        f = torch.stack([F.normalize(tokens_by_hand(model, x[b:b + 1], LAYER, "k")[4:], dim=-1) for b in range(2)])
    cos = f @ f.transpose(1, 2)  # (2, 64, 64)
    side = (torch.arange(64) % 8 >= 4)
    iu = torch.triu_indices(64, 64, 1)
    same = side[iu[0]] == side[iu[1]]
    pairs = cos[:, iu[0], iu[1]]
    assert np.allclose(np.sort(got.intra), np.sort(pairs[:, same].flatten().numpy()), atol=1e-5)
    assert np.allclose(np.sort(got.inter), np.sort(pairs[:, ~same].flatten().numpy()), atol=1e-5)
