"""Attention locality (ConViT's mean attention distance per head): planted maps with known values, and the
value read from a ViT (every conformance variant) and a ConViT equal to a plain-torch oracle that recomputes the
attention from the weights (spec: augment-pretrain.md §F, applications.md #32)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from vitkit.explain.locality import attention_locality, mean_attention_distance

from conftest import VARIANTS, make_variant


def oracle_distance(attn: torch.Tensor, gh: int, gw: int) -> list[float]:
    """Per head: mean over images and queries of sum_k A_qk * |pos_q - pos_k|, by explicit loops."""
    B, H, P, _ = attn.shape
    out = []
    for h in range(H):
        total = 0.0
        for b in range(B):
            for q in range(P):
                row = attn[b, h, q] / attn[b, h, q].sum()
                for k in range(P):
                    total += float(row[k]) * math.hypot(q // gw - k // gw, q % gw - k % gw)
        out.append(total / (B * P))
    return out


def planted(gh: int, gw: int) -> torch.Tensor:
    """(1, 4, P, P): head 0 attends to itself (0), head 1 to the patch below (above in the last row) (1),
    head 2 to the patch one down and two right, mirrored at the borders (sqrt 5), head 3 uniformly."""
    P = gh * gw
    a = torch.zeros(1, 4, P, P)
    for q in range(P):
        r, c = divmod(q, gw)
        a[0, 0, q, q] = 1
        a[0, 1, q, (r + 1 if r + 1 < gh else r - 1) * gw + c] = 1
        a[0, 2, q, (r + 1 if r + 1 < gh else r - 1) * gw + (c + 2 if c + 2 < gw else c - 2)] = 1
    a[0, 3] = 1 / P
    return a


def test_planted_local_map_has_its_known_distance():
    gh, gw = 3, 5  # not square: swapped grid axes would move head 1's key two columns away
    got = mean_attention_distance(planted(gh, gw), (gh, gw))
    uniform = sum(math.hypot(i // gw - j // gw, i % gw - j % gw) for i in range(15) for j in range(15)) / 15 ** 2
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, math.sqrt(5), uniform]), atol=1e-6, rtol=0)
    assert got[3] == pytest.approx(oracle_distance(planted(gh, gw), gh, gw)[3], abs=1e-6)


def vit_oracle(model, x) -> dict[int, list[float]]:
    """Walk a timm ViT's blocks by hand; softmax(q k^T * scale) per head, patch rows and keys only."""
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        p = model.num_prefix_tokens
        out = {}
        for i, blk in enumerate(model.blocks):
            y = blk.norm1(t)
            B, N, C = y.shape
            a = blk.attn
            qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            attn = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)
            gh, gw = model.patch_embed.grid_size
            out[i] = oracle_distance(attn[:, :, p:, p:], gh, gw)
            t = blk(t)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vit_locality_equals_eager_oracle(name):
    model = make_variant(name, depth=2, img_size=16)
    with torch.no_grad():  # sharpen attention so that it is far from uniform
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = attention_locality(model, x)
    want = vit_oracle(model, x)
    assert sorted(got) == sorted(want)
    for i in got:
        torch.testing.assert_close(got[i], torch.tensor(want[i]), atol=1e-5, rtol=0)


def test_convit_locality_equals_gpsa_oracle():
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=16, patch_size=4, embed_dim=8, depth=2,
                              num_heads=4, local_up_to_layer=1, num_classes=3).eval()
    with torch.no_grad():
        model.blocks[0].attn.gating_param.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = attention_locality(model, x)
    gh, gw = 4, 4
    with torch.no_grad():  # GPSA from the paper: (1 - σ(λ)) softmax(q kᵀ/√d) + σ(λ) softmax(v_pos · r_qk)
        t = model.pos_drop(model.patch_embed(x) + model.pos_embed)
        blk = model.blocks[0]
        y = blk.norm1(t)
        a = blk.attn
        B, N, C = y.shape
        qk = a.qk(y).reshape(B, N, 2, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        content = (qk[0] @ qk[1].transpose(-2, -1) / math.sqrt(C // a.num_heads)).softmax(-1)
        rows, cols = torch.arange(N) // gw, torch.arange(N) % gw
        dx, dy = cols[None] - cols[:, None], rows[None] - rows[:, None]
        rel = torch.stack([dx, dy, dx ** 2 + dy ** 2], -1).float()  # (N, N, 3): x, y, squared distance
        positional = (rel @ a.pos_proj.weight.T + a.pos_proj.bias).permute(2, 0, 1).softmax(-1)  # (h, N, N)
        gate = torch.sigmoid(a.gating_param).view(1, -1, 1, 1)
        attn = (1 - gate) * content + gate * positional
        want0 = oracle_distance(attn, gh, gw)
        t = blk(t)
        t = torch.cat([model.cls_token.expand(B, -1, -1), t], 1)  # the class token joins at local_up_to_layer
        blk = model.blocks[1]
        y = blk.norm1(t)
        qkv = blk.attn.qkv(y).reshape(B, N + 1, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
        want1 = oracle_distance((qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(C // 4)).softmax(-1)[:, :, 1:, 1:],
                                gh, gw)
    torch.testing.assert_close(got[0], torch.tensor(want0), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], torch.tensor(want1), atol=1e-5, rtol=0)
    assert float(got[0].std()) > 0.05, got[0]  # the gates differ per head, so do the distances


def test_cnn_and_token_reduction_are_refused():
    cnn = timm.create_model("test_resnet", pretrained=False).eval()
    with pytest.raises(NotImplementedError, match="locality: a ResNet has no global attention map"):
        attention_locality(cnn, torch.randn(1, 3, 32, 32))
    import vitkit as vk

    model = make_variant("plain", depth=2)
    vk.accelerate(model, "tome", r=4)
    with pytest.raises(NotImplementedError, match="merged or dropped tokens"):
        attention_locality(model, torch.randn(1, 3, 32, 32))
