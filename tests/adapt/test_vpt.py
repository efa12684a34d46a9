"""VPT shallow and deep: n = 0 identity, counts, tokens per block, prompt permutation, gradients, pooling without
prompts, fused SDPA, dynamic size, composition with token merging."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant

D, L, N = TINY["embed_dim"], TINY["depth"], 5
GRID = (32 // 4) ** 2


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def block_lengths(model, images) -> list[int]:
    lengths = []
    hooks = [b.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return lengths


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_zero_prompts_is_identity(name, deep, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.adapt(model, "vpt", num_prompts=0, deep=deep)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep,per_model", [(False, N * D), (True, L * N * D)], ids=["shallow", "deep"])
def test_trainable_count_formula(deep, per_model):
    model = vk.adapt(make_variant("plain"), "vpt", num_prompts=N, deep=deep)
    assert trainable(model) == per_model + D * 10 + 10
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"vpt.prompts", "head.weight", "head.bias"}


def test_vit_base_deep_50_prompts_count():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vk.adapt(model, "vpt", num_prompts=50, deep=True)
    assert trainable(model) == 460_800


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_block_length_is_prefix_plus_prompts_plus_patches(name, deep, images):
    model = make_variant(name)
    p = model.num_prefix_tokens
    vk.adapt(model, "vpt", num_prompts=N, deep=deep)
    assert block_lengths(model, images) == [p + N + GRID] * L
    with torch.no_grad():  # prompts are stripped before the final norm and pooling
        assert model.forward_features(images).shape == (2, p + GRID, D)
        inter = model.forward_intermediates(images, indices=2, intermediates_only=True)
    assert [tuple(t.shape) for t in inter] == [(2, D, 8, 8)] * 2


def test_dynamic_img_size_48px():
    model = make_variant("registers", dynamic_img_size=True)
    vk.adapt(model, "vpt", num_prompts=N, deep=True)
    x = torch.randn(2, 3, 48, 48)
    assert block_lengths(model, x) == [model.num_prefix_tokens + N + 144] * L
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["plain", "reg_no_cls"])
def test_permuting_prompts_leaves_logits_unchanged(name, images):
    """Prompts carry no position embedding, so their order within a layer does not matter."""
    model = vk.adapt(make_variant(name), "vpt", num_prompts=N, deep=True)
    with torch.no_grad():
        out = model(images)
        model.vpt.prompts.copy_(model.vpt.prompts[:, torch.randperm(N)])
        torch.testing.assert_close(model(images), out, atol=1e-5, rtol=1e-5)


def test_deep_prompts_replace_not_accumulate(images):
    """Changing layer i's prompts changes nothing before block i; the prompt slots after each block are replaced."""
    model = vk.adapt(make_variant("plain"), "vpt", num_prompts=N, deep=True)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for b in model.blocks]
    with torch.no_grad():
        model(images)
        first = list(outs)
        outs.clear()
        model.vpt.prompts[3].add_(1.0)
        model(images)
    for h in hooks:
        h.remove()
    for i in range(3):
        torch.testing.assert_close(outs[i], first[i], atol=0, rtol=0)
    assert (outs[3] - first[3]).abs().max() > 1e-3


def test_every_prompt_layer_gets_a_gradient_and_no_backbone_parameter_does(images):
    model = vk.adapt(make_variant("registers"), "vpt", num_prompts=N, deep=True)
    model(images).sum().backward()
    grad = model.vpt.prompts.grad
    assert grad is not None and all(grad[i].abs().max() > 0 for i in range(L))
    backbone = [n for n, p in model.named_parameters() if p.grad is not None and not n.startswith(("vpt.", "head."))]
    assert backbone == []


def test_avg_pool_is_over_patches_only(images):
    model = vk.adapt(make_variant("no_cls_avg"), "vpt", num_prompts=N, deep=True)
    with torch.no_grad():
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, model.fc_norm(feats.mean(1)), atol=1e-6, rtol=1e-6)


def test_fused_attention_kept():
    model = vk.adapt(make_variant("plain"), "vpt", deep=True)
    assert all(b.attn.fused_attn for b in model.blocks)


def test_composes_with_token_merging(images):
    """Prompts count as prefix tokens: ToMe merges patches only, and the deep prompts stay in their slots."""
    model = vk.adapt(make_variant("registers"), "vpt", num_prompts=N, deep=True)
    vk.accelerate(model, "tome", r=4)
    p = model.num_prefix_tokens
    lengths = block_lengths(model, images)
    assert lengths == [p + N + GRID - 4 * (i + 1) for i in range(L)], lengths
    with torch.no_grad():
        assert model(images).shape == (2, 10)


def test_bad_config():
    with pytest.raises(ValueError, match="vpt: `num_prompts` must be >= 0"):
        vk.adapt(make_variant("plain"), "vpt", num_prompts=-1)
    model = vk.adapt(make_variant("plain"), "vpt")
    with pytest.raises(ValueError, match="vpt: already applied"):
        vk.adapt(model, "vpt")
