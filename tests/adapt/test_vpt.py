"""VPT shallow and deep: n = 0 identity, counts, tokens per block, prompt permutation, gradients, pooling without
prompts, fused SDPA, dynamic size, composition with token merging."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vit_oracle import base_tensors, vit_forward

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


def test_zero_prompts_runs_the_registered_path(images):
    """n = 0 is not an early return: the hook is registered, the prompt tensor exists (L x 0 x D) and the block
    input still counts prefix + 0 prompts + patches."""
    from vitkit.models.runner import get_runner

    model = make_variant("registers")
    reference = copy.deepcopy(model)
    vk.adapt(model, "vpt", num_prompts=0, deep=True)
    assert "vpt" in get_runner(model).owners() and tuple(model.vpt.prompts.shape) == (L, 0, D)
    calls = []
    hook = model.vpt.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=0, rtol=0)
    hook.remove()
    assert calls == [(2, 0, D)] * L


# ---------------------------------------------------------------- init and oracle: plain torch from the spec (P3)

def test_init_is_uniform_with_the_xavier_bound_from_patch_and_width():
    """Spec: U(-v, v), v = sqrt(6 / (3·p² + D)); p = 4, D = 64: v = sqrt(6 / 112) = 0.2315."""
    torch.manual_seed(0)
    model = vk.adapt(make_variant("plain"), "vpt", num_prompts=50, deep=True)
    v = (6 / (3 * 4 * 4 + D)) ** 0.5
    p = model.vpt.prompts.detach().flatten()
    assert p.numel() == L * 50 * D
    assert p.abs().max() <= v and p.abs().max() > 0.99 * v, (p.abs().max().item(), v)
    assert abs(p.std().item() - v / 3 ** 0.5) < 0.02 * v, (p.std().item(), v / 3 ** 0.5)  # uniform: std v/sqrt(3)
    assert abs(p.mean().item()) < 0.02 * v
    fractions = torch.histc(p, bins=10, min=-v, max=v) / p.numel()  # flat: each tenth of [-v, v] holds ~10%
    assert (fractions - 0.1).abs().max() < 0.015, fractions


def prompt_oracle(prompts):
    """Block 0: [prefix | Π_0 | patches] (no position embedding); deep: before block i > 0, slots replaced by Π_i."""
    n = prompts.shape[1]

    def before_block(i, t, p):
        if i == 0:
            return torch.cat([t[:, :p], prompts[0].expand(t.shape[0], -1, -1), t[:, p:]], dim=1)
        if prompts.shape[0] == 1:
            return t
        return torch.cat([t[:, :p], prompts[i].expand(t.shape[0], -1, -1), t[:, p + n:]], dim=1)
    return before_block


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("name", ["plain", "registers"])
def test_matches_plain_torch_oracle(name, deep, images):
    model = vk.adapt(make_variant(name), "vpt", num_prompts=N, deep=deep)
    with torch.no_grad():
        model.vpt.prompts.mul_(10)  # prompts that move the logits well above the tolerance
        out = model(images)
    sd = base_tensors(model)
    expected = vit_forward(sd, images, heads=4, before_block=prompt_oracle(sd["vpt.prompts"]), num_prompts=N)
    assert (expected - make_variant(name)(images)).abs().max() > 1e-3  # 100x the tolerance
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_layout_is_prefix_then_prompts_then_patches(deep, images):
    """Outputs cannot see where prompts sit (no position embedding); the layout matters to token methods and
    explainers, so read it: what each block normalises is [cls, registers | prompts | patches]."""
    model = vk.adapt(make_variant("registers"), "vpt", num_prompts=N, deep=deep)
    p, inputs = model.num_prefix_tokens, []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(images)
        plain = make_variant("registers")
        tokens = plain._pos_embed(plain.patch_embed(images))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(inputs[0][:, :p], tokens[:, :p], atol=0, rtol=0)
    torch.testing.assert_close(inputs[0][:, p + N:], tokens[:, p:], atol=0, rtol=0)
    for i in range(L if deep else 1):
        torch.testing.assert_close(inputs[i][:, p:p + N], model.vpt.prompts[i].expand(2, -1, -1), atol=0, rtol=0)


def test_prompt_dropout_on_the_inserted_prompts(images):
    """Train mode, fixed seed: the prompts are dropped out (one mask per layer's prompts) as they are inserted."""
    model = vk.adapt(make_variant("plain"), "vpt", num_prompts=N, deep=True, dropout=0.5).train()
    with torch.no_grad():
        model.vpt.prompts.mul_(10)
        torch.manual_seed(5)
        out = model(images)
        torch.manual_seed(5)
        dropped = torch.stack([torch.nn.functional.dropout(model.vpt.prompts[i], 0.5, True) for i in range(L)])
    sd = base_tensors(model)
    expected = vit_forward(sd, images, heads=4, before_block=prompt_oracle(dropped), num_prompts=N)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="vpt: `num_prompts` must be >= 0"):
        vk.adapt(make_variant("plain"), "vpt", num_prompts=-1)
    model = vk.adapt(make_variant("plain"), "vpt")
    with pytest.raises(ValueError, match="vpt: already applied"):
        vk.adapt(model, "vpt")
