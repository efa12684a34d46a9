"""TCPA (adapt.md P7): prompt pools per layer, top-k coordination, post-softmax mask without renormalisation.

The oracle recomputes one changed block by hand from the spec: cosine of the block input with the pool keys,
top-k slots per token (class row: CLS pool, patch rows: image pool, registers: none), softmax over every original
and prompt key, multiply by the 0/1 mask without renormalising, `proj(A v)`, residual, MLP. It calls only timm's
own norms / MLP / LayerScale / q-k norms and the model's tensors.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.adapt import tcpa


def tcpa_model(variant="registers", model_args=None, **cfg):
    model = make_variant(variant, **(model_args or {}))
    vk.adapt(model, "tcpa", **{"pool_size": 6, "prompt_length": 2, "top_k": 2, **cfg})
    return model


def oracle_block(model, i, x):
    """(output (B, N, D), post-mask attention (B, h, N, N + p)) of changed block i on its input x."""
    blk, pools = model.blocks[i], model.tcpa
    j, k = pools.layers.index(i), pools.top_k
    has_cls = model.cls_token is not None
    P = model.num_prefix_tokens
    B, N, D = x.shape
    M, ell = pools.img_prompts.shape[1:3]
    top = lambda t, keys: F.cosine_similarity(t[:, :, None], keys[None, None], dim=-1).topk(k, -1).indices  # noqa
    groups = ([pools.cls_prompts[j]] if has_cls else []) + [pools.img_prompts[j]]
    prompts = torch.cat([g.reshape(M * ell, D) for g in groups])
    y = blk.norm1(torch.cat([x, prompts.expand(B, -1, -1)], 1))
    h = blk.attn.num_heads
    d = D // h
    q, kk, v = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, -1, 3, h, d).permute(2, 0, 3, 1, 4)
    a = (blk.attn.q_norm(q[:, :, :N]) @ blk.attn.k_norm(kk).transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    mask = torch.zeros(B, N, a.shape[-1])
    mask[:, :, :N] = 1
    img = top(x[:, P:], pools.img_keys[j])
    cls = top(x[:, :1], pools.cls_keys[j]) if has_cls else None
    off = N + (M * ell if has_cls else 0)
    for b in range(B):
        for m in (cls[b, 0] if has_cls else []):
            mask[b, 0, N + m * ell:N + (m + 1) * ell] = 1
        for t in range(N - P):
            for m in img[b, t]:
                mask[b, P + t, off + m * ell:off + (m + 1) * ell] = 1
    a = a * mask[:, None]
    o = F.linear((a @ v).transpose(1, 2).reshape(B, N, D), blk.attn.proj.weight, blk.attn.proj.bias)
    x1 = x + blk.ls1(o)
    return x1 + blk.ls2(blk.mlp(blk.norm2(x1))), a


def block_io(model, i, images):
    seen = {}
    h1 = model.blocks[i].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    h2 = model.blocks[i].register_forward_hook(lambda m, a, out: seen.update(y=out))
    try:
        logits = model(images)
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["y"], logits


@pytest.mark.parametrize("variant", ["registers", "reg_no_cls", "qk_norm", "layerscale"])
def test_changed_block_matches_the_oracle(variant, images):
    model = tcpa_model(variant)
    with torch.no_grad():
        x, y, _ = block_io(model, 3, images)
        want, a = oracle_block(model, 3, x)
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)
    P, N = model.num_prefix_tokens, x.shape[1]
    allowed = (a > 0).sum(-1)[:, 0]  # keys kept per row (B, N)
    assert (allowed[:, P:] == N + 2 * 2).all()  # N0 + k·ℓ
    assert (allowed[:, 1 if model.cls_token is not None else 0:P] == N).all()  # registers see no prompt


def test_masked_rows_sum_below_one_in_the_model(images, monkeypatch):
    rows = []
    real = tcpa.algo.masked_attention

    def spy(*args, **kwargs):
        a = real(*args, **kwargs)
        rows.append(a.sum(-1))
        kept.append((a > 0).sum(-1))
        return a

    kept = []

    monkeypatch.setattr(tcpa.algo, "masked_attention", spy)
    model = tcpa_model("registers")
    with torch.no_grad():
        model(images)
    assert len(rows) == len(model.blocks)
    for s in rows:  # (B, h, N): every row loses the softmax mass of the prompts it does not see
        assert s.max() < 1 and s.min() > 0.2, (s.min(), s.max())
    for n in kept:  # keys kept per row: N0 + k·ℓ for the class token and the patches, N0 for the registers
        N = n.shape[-1]
        assert (n[:, :, 0] == N + 4).all() and (n[:, :, 5:] == N + 4).all() and (n[:, :, 1:5] == N).all()


def test_unchosen_prompts_act_through_the_softmax_denominator_and_their_keys_do_not(images):
    model = tcpa_model("plain", layers=(-1,), top_k=1)
    with torch.no_grad():
        model.blocks[5].attn.qkv.weight[:128] *= 4  # sharper attention: each key's logit matters
        _, before, _ = block_io(model, 5, images)
        cls_idx, _ = vk.models.runner.get_runner(model).state.extra["tcpa"]
        unused = sorted(set(range(6)) - set(cls_idx.flatten().tolist()))[0]  # a CLS slot neither image picks
        model.tcpa.cls_keys[0, unused] *= 0.9  # still chosen by no class token: the output is the same
        torch.testing.assert_close(block_io(model, 5, images)[1], before, atol=0, rtol=0)
        model.tcpa.cls_prompts[0, unused] += torch.randn(2, 64)  # seen by no row, yet in every softmax denominator
        assert (block_io(model, 5, images)[1] - before).abs().max() > 5e-5  # renormalised: exactly 0


def test_pool_loss_is_the_spec_formula_and_only_it_moves_the_keys(images):
    model = tcpa_model("registers", loss_weight=0.1)
    logits = model(images)
    want = 0.0
    with torch.no_grad():
        for i in range(len(model.blocks)):
            x, _, _ = block_io(model, i, images)
            j = model.tcpa.layers.index(i)
            cos_c = F.cosine_similarity(x[:, :1, None], model.tcpa.cls_keys[j][None, None], -1).topk(2, -1).values
            cos_p = F.cosine_similarity(x[:, 5:, None], model.tcpa.img_keys[j][None, None], -1).topk(2, -1).values
            want += (1 - cos_c).mean() + (1 - cos_p).mean()
    model(images)
    torch.testing.assert_close(tcpa.pool_loss(model), 0.1 * want, atol=1e-5, rtol=1e-5)
    assert tcpa.pool_loss in model.__dict__["_vitkit_losses"]  # vk.fit adds it to the task loss
    for w, moves in ((0.0, False), (0.1, True)):
        m = tcpa_model("registers", loss_weight=w)
        (F.cross_entropy(m(images), torch.tensor([1, 2])) + tcpa.pool_loss(m)).backward()
        g = m.tcpa.img_keys.grad
        assert (g is not None and g.abs().sum() > 0) == moves
        assert m.tcpa.img_prompts.grad.abs().sum() > 0 and m.blocks[0].attn.qkv.weight.grad is None


@pytest.mark.parametrize("variant,pools", [("registers", 2), ("no_cls_avg", 1)])
def test_trainable_parameter_count(variant, pools):
    model = tcpa_model(variant, layers=(0, 2, -1))
    D, head = model.embed_dim, 10 * model.embed_dim + 10
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 3 * pools * (6 * D + 6 * 2 * D) + head
    assert vk.info(model).eager_attention == {"tcpa": [0, 2, 5]}


def test_identity_runs_the_eager_path(images):
    model = make_variant("qk_norm")
    ref = copy.deepcopy(model)
    vk.adapt(model, "tcpa", pool_size=0, top_k=0)
    assert isinstance(model.blocks[0].attn.__dict__["forward"], tcpa._Attention)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref(images), atol=1e-5, rtol=1e-5)


def test_other_sizes_checkpointing_and_token_merging(images):
    model = tcpa_model("reg_no_cls", dict(dynamic_img_size=True))
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 32)
    for m in (model, ref):
        (m(x).logsumexp(-1).sum() + tcpa.pool_loss(m)).backward()
    torch.testing.assert_close(model.tcpa.img_keys.grad, ref.tcpa.img_keys.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.tcpa.img_prompts.grad, ref.tcpa.img_prompts.grad, atol=1e-6, rtol=1e-5)
    merged = tcpa_model("registers")
    vk.accelerate(merged, "tome", r=4)
    with torch.no_grad():
        assert merged(images).shape == (2, 10)


def test_refusals_and_bad_values(images):
    with pytest.raises(ValueError, match="tcpa: `top_k` must be in 1..pool_size"):
        vk.adapt(make_variant("plain"), "tcpa", top_k=30)
    with pytest.raises(ValueError, match="tcpa: `layers` \\[9\\] out of range"):
        vk.adapt(make_variant("plain"), "tcpa", layers=(9,))
    with pytest.raises(NotImplementedError, match="tcpa's masked eager attention"):
        vk.explain(tcpa_model("plain"), images, method="rollout")


def test_vk_fit_trains_pools_and_keys_through_the_pool_loss(tmp_path):
    model = tcpa_model("plain", layers=(-1,), dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, torch.arange(20) % 10)
    result = vk.fit(model, data, epochs=1, batch_size=10, weight_decay=0.0, out_dir=tmp_path, progress=False,
                    save_model=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"tcpa.img_keys", "tcpa.cls_keys", "tcpa.img_prompts", "tcpa.cls_prompts", "head.weight"} <= moved
    assert not any(n.startswith("blocks.") for n in moved), moved
    assert result.config["lr"] == 3e-2  # the method's own lr
