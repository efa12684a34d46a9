"""Prompt-CAM (adapt.md P8, explain.md E3): class prompts per layer, logits read from the last layer's prompt
outputs, maps from the target prompt's last-layer attention with greedy head blurring.

The oracle below walks the blocks by hand from the spec (prompts after the prefix at block 0, replaced before
every later block, kept after the last; `z_c = w·norm(h_L[c]) + b`; blurring = the target row's pre-softmax logits
set to 0 in the blurred heads), calling only timm's own norms / MLP / LayerScale and the model's tensors.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import VARIANTS, make_variant

CLASSES = 10


def oracle(model, x, blur=None, target=None):
    """(logits (B, C), last-layer attention (B, h, N, N)); `blur` (B, h) bool blurs row P + target[b]."""
    P, prompts = model.num_prefix_tokens, model.prompt_cam.prompts.detach()
    L, C, D = prompts.shape
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B = t.shape[0]
    for i, blk in enumerate(model.blocks):
        rest = t[:, P:] if i == 0 else t[:, P + C:]
        t = torch.cat([t[:, :P], prompts[i].expand(B, -1, -1), rest], dim=1)
        N, h = t.shape[1], blk.attn.num_heads
        d = D // h
        q, k, v = F.linear(blk.norm1(t), blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(
            B, N, 3, h, d).permute(2, 0, 3, 1, 4)
        s = blk.attn.q_norm(q) @ blk.attn.k_norm(k).transpose(-1, -2) / math.sqrt(d)
        if blur is not None and i == L - 1:
            for b in range(B):
                s[b, blur[b], P + target[b]] = 0.0
        a = s.softmax(-1)
        o = F.linear((a @ v).transpose(1, 2).reshape(B, N, D), blk.attn.proj.weight, blk.attn.proj.bias)
        t = t + blk.ls1(o)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    z = model.fc_norm(model.norm(t[:, P:P + C]))
    return F.linear(z, model.head.weight, model.head.bias)[..., 0], a


def prompt_cam_model(variant="registers", **extra):
    model = make_variant(variant, **extra)
    vk.adapt(model, "prompt-cam")
    torch.manual_seed(5)
    with torch.no_grad():  # a read-out that separates the classes
        model.head.weight.normal_(0, 1.0)
        model.prompt_cam.prompts.normal_(0, 1.0)
    return model


def test_logits_and_last_attention_match_the_oracle(images):
    model = prompt_cam_model("registers")
    with torch.no_grad():
        want, _ = oracle(model, images)
        got = model(images)
    assert got.shape == (2, CLASSES)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0.1  # the prompts change the logits: the comparison is not degenerate


def test_trainable_count_and_block_length(images):
    model = prompt_cam_model("registers")
    L, D = len(model.blocks), model.embed_dim
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == L * CLASSES * D + D + 1, trainable
    lengths = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    assert lengths == [5 + CLASSES + 64] * L  # P (cls + 4 registers) + C + G²


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permuting_class_prompts_permutes_logits(variant, images):
    model = prompt_cam_model(variant, dynamic_img_size=True)
    x = torch.randn(2, 3, 48, 32)
    perm = torch.randperm(CLASSES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        model.prompt_cam.prompts.copy_(model.prompt_cam.prompts[:, perm])
        after = model(x)
    torch.testing.assert_close(after, before[:, perm], atol=2e-5, rtol=2e-5)


def test_class_token_output_after_the_last_block_is_not_read(images):
    model = prompt_cam_model("plain")
    with torch.no_grad():
        before = model(images)
        hook = model.blocks[-1].register_forward_hook(lambda m, a, out: torch.cat([out[:, :1] * 0, out[:, 1:]], 1))
        after = model(images)
        hook.remove()
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_gradient_checkpointing_same_logits_and_gradients(images):
    model = prompt_cam_model("layerscale")
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (model, ref):
        m(images).logsumexp(-1).sum().backward()
    torch.testing.assert_close(model.prompt_cam.prompts.grad, ref.prompt_cam.prompts.grad, atol=1e-6, rtol=1e-5)
    assert ref.prompt_cam.prompts.grad.abs().sum() > 0 and all(
        p.grad is None for n, p in ref.named_parameters() if n.startswith("blocks"))


def test_refuses_a_model_without_classes():
    model = make_variant("plain", num_classes=0)
    with pytest.raises(ValueError, match="prompt-cam: needs one prompt per class"):
        vk.adapt(model, "prompt-cam")


# ---- maps (explain.md E3) -------------------------------------------------------------------------------------

def greedy_oracle(model, x, target):
    """Heads ranked by the spec's greedy blurring, by brute force over the oracle forward."""
    h = model.blocks[-1].attn.num_heads
    ranking = []
    for b in range(x.shape[0]):
        blurred = []
        while len(blurred) < h:
            probs = {}
            for j in [j for j in range(h) if j not in blurred]:
                mask = torch.zeros(1, h, dtype=torch.bool)
                mask[0, blurred + [j]] = True
                probs[j] = oracle(model, x[b:b + 1], mask, [target[b]])[0].softmax(-1)[0, target[b]].item()
            blurred.append(max(probs, key=probs.get))
        ranking.append(blurred[::-1])
    return torch.tensor(ranking)


@pytest.mark.parametrize("variant", ["registers", "qk_norm"])
def test_maps_and_ranking_match_the_oracle(variant, images):
    model = prompt_cam_model(variant)
    target = [3, 7]
    e = vk.explain(model, images, method="prompt-cam", target=target, top_traits=2)
    with torch.no_grad():
        logits, a = oracle(model, images)
        P, grid = model.num_prefix_tokens, model.patch_embed.grid_size
        want = torch.stack([a[b, :, P + target[b], P + CLASSES:] for b in range(2)]).reshape(2, -1, *grid)
        ranking = greedy_oracle(model, images, target)
    torch.testing.assert_close(e.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.head_maps, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(e.head_ranking, ranking), (e.head_ranking, ranking)
    top2 = torch.stack([want[b, ranking[b, :2]].mean(0) for b in range(2)])
    torch.testing.assert_close(e.patch_map, top2, atol=1e-6, rtol=1e-5)
    assert e.target == target and e.heatmap.shape == (2, 32, 32)


def test_no_blur_reproduces_the_logits_and_full_blur_is_uniform(images):
    from vitkit.explain import prompt_cam

    model = prompt_cam_model("registers")
    t = torch.tensor([1, 4])
    with torch.no_grad():
        logits, cache = prompt_cam.run(model, images)
        eager, _ = prompt_cam.last_block(model, cache, t)
        _, a = prompt_cam.last_block(model, cache, t, torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(eager, logits, atol=1e-6, rtol=1e-6)
    rows = a[torch.arange(2), :, t]  # (B, h, N)
    torch.testing.assert_close(rows, torch.full_like(rows, 1 / rows.shape[-1]), atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 0], torch.full_like(a[:, :, 0], 1 / rows.shape[-1]))  # other rows untouched


def test_explain_refuses_clearly(images):
    with pytest.raises(ValueError, match="needs a Prompt-CAM model"):
        vk.explain(make_variant("plain"), images, method="prompt-cam")
    model = prompt_cam_model("plain")
    with pytest.raises(ValueError, match="`top_traits` must be an int in 1..4"):
        vk.explain(model, images, method="prompt-cam", top_traits=5)
    with pytest.raises(ValueError, match="`target` 10 is not a class"):
        vk.explain(model, images, method="prompt-cam", target=10)


def test_composes_with_token_merging_and_the_maps_refuse_it(images):
    model = prompt_cam_model("registers")
    with torch.no_grad():
        before = model(images)
        vk.accelerate(model, "tome", r=4)
        after = model(images)  # the class prompts are protected like prefix tokens: merging changes only patches
    assert after.shape == before.shape and (after - before).abs().max() > 0
    with pytest.raises(NotImplementedError, match="tome \\(after_attn\\) changes that block"):
        vk.explain(model, images, method="prompt-cam")


def test_forward_head_refuses_features_of_another_forward(images):
    """The logits come from the class-prompt outputs of the forward that made the features: an earlier batch's
    features after another forward of the same size would silently get that forward's logits."""
    model = prompt_cam_model("registers")
    with torch.no_grad():
        want = model(images)
        feats = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(feats), want)
        model.forward_features(images.flip(0))
        with pytest.raises(ValueError, match="prompt-cam: forward_head reads side results of the forward"):
            model.forward_head(feats)
