"""Hint-Aug: zero strength is the identity (registered path); the AOD patch choice and the CFI step against a
plain-torch oracle (attention walked by hand, Adam's first step written out); confusion bookkeeping per epoch;
patch -> pixel mapping on a non-square grid; refusal under token reduction."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.augment import mix_batch


def _student_and_teacher(name="plain", **cfg):
    """A model with Hint-Aug attached (teacher = its copy now), then its weights moved as training would."""
    model = make_variant(name)
    vk.augment(model, "hint-aug", **{"start_epoch": 0, **cfg})
    torch.manual_seed(5)
    with torch.no_grad():
        for block in model.blocks[:3]:
            block.attn.qkv.weight.mul_(3.0).add_(0.2 * torch.randn_like(block.attn.qkv.weight))
    return model, model.__dict__["_vitkit_augment"]["hint-aug"]


def attention_scores_oracle(model, x, layer):
    """Head-mean softmax attention of block `layer`, computed from timm's sub-modules by hand; each key column
    L2-normalised over the queries, averaged over the queries; prefix columns dropped -> (B, G)."""
    t = model._pos_embed(model.patch_embed(x))
    for block in model.blocks[:layer]:
        t = t + block.ls1(block.attn(block.norm1(t)))
        t = t + block.ls2(block.mlp(block.norm2(t)))
    attn = model.blocks[layer].attn
    B, N, D = t.shape
    h = attn.num_heads
    q, k, _ = attn.qkv(model.blocks[layer].norm1(t)).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    a = torch.softmax(attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2) / math.sqrt(D // h), dim=-1).mean(1)
    a = a / a.norm(dim=1, keepdim=True)
    return a.mean(1)[:, model.num_prefix_tokens:]


@pytest.mark.parametrize("name", ["plain", "registers", "no_cls_avg"])
def test_zero_strength_is_identity(name):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.augment(model, "hint-aug", epsilon=0.0, start_epoch=0)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([1, 2, 3])
    mix = mix_batch(model, x, y)
    assert torch.equal(mix.images[3:], x) and torch.equal(mix.images[:3], x) and torch.equal(mix.labels[3:], y)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


@pytest.mark.parametrize("threshold,branch", [(0.0, "teacher"), (10.0, "student")])
def test_patch_choice_and_cfi_step_match_the_oracle(threshold, branch):
    model, hook = _student_and_teacher(threshold=threshold, num_patch=3, epsilon=0.03)
    layer = round(len(model.blocks) / 3)
    hook.acc_previous = torch.rand(10, 10) * 5  # the confusion of a finished epoch
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([4, 7])
    with torch.no_grad():
        teacher = attention_scores_oracle(hook.teacher, x, layer)
        student = attention_scores_oracle(model, x, layer)
    delta = teacher - student
    assert (delta.abs().amax(1) > threshold).all() == (branch == "teacher")
    chosen = (delta if branch == "teacher" else student).topk(3, dim=1).indices
    mask = torch.zeros(2, 64).scatter(1, chosen, 1.0).view(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    y_att = torch.softmax(hook.acc_previous[y], dim=-1)
    std, mean = 0.5, 0.5  # the tiny models' normalisation (timm's default cfg for vit_tiny: 0.5)
    r = 0.03 / std

    torch.manual_seed(11)
    mix = mix_batch(model, x, y)
    torch.manual_seed(11)  # same δ0 draw: Adam's first step is lr·g / (|g| + 1e-8), towards a larger CE
    delta0 = (torch.rand_like(x) * 2 - 1) * r
    d = delta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x + d * mask), y_att), d)
    delta1 = (delta0 + 0.1 * g / (g.abs() + 1e-8)).clamp(-r, r)
    expected = x + ((x + delta1).clamp((0 - mean) / std, (1 - mean) / std) - x) * mask
    torch.testing.assert_close(mix.images[2:], expected, atol=1e-6, rtol=0)
    changed = (mix.images[2:] != x).any(1, keepdim=True)
    assert changed.float().sum() > 0 and not (changed & (mask == 0)).any()
    assert (mix.images[2:] - x).abs().max() <= r + 1e-6
    with torch.no_grad():  # the step raises the CE against the confusion targets
        assert F.cross_entropy(model(mix.images[2:]), y_att) > F.cross_entropy(model(x + delta0 * mask), y_att)
    hook.set_epoch(1)
    assert hook.drift_rates == [(0, 1.0 if branch == "teacher" else 0.0)]
    soft = mix.target(10)
    assert torch.equal(soft[:2], F.one_hot(y, 10).float())
    torch.testing.assert_close(soft[2:].max(1).values, torch.full((2,), 0.9))


def test_confusion_is_summed_per_epoch_and_rolls_over():
    model, hook = _student_and_teacher(start_epoch=5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 3, 3])
    mix = mix_batch(model, x, y)
    assert mix.images.shape[0] == 4  # before start_epoch: nothing added, logits recorded
    with torch.no_grad(), mix.forward():
        logits = model(mix.images)
    shifted = logits - logits.min(1, keepdim=True).values
    torch.testing.assert_close(hook.acc[0], shifted[:2].sum(0))
    torch.testing.assert_close(hook.acc[3], shifted[2:].sum(0))
    assert hook.acc[[1, 2]].abs().sum() == 0
    acc = hook.acc
    hook.set_epoch(1)
    assert hook.acc is None and hook.acc_previous is acc


def test_fit_runs_the_clean_and_the_perturbed_batch(tmp_path):
    model = make_variant("qk_norm")
    vk.augment(model, "hint-aug", start_epoch=1, epsilon=0.05)
    vk.adapt(model, "vpt", num_prompts=2)
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8) % 4)
    result = vk.fit(model, data, epochs=2, batch_size=4, out_dir=tmp_path, progress=False, save_model=False)
    hook = model.__dict__["_vitkit_augment"]["hint-aug"]
    assert hook.acc_previous is not None and hook.samples == 8  # epoch 2 augmented all 8 images
    assert all(0 <= h["train_acc"] <= 1 for h in result.history)


def test_patch_mask_on_a_non_square_grid():
    from vitkit.augment.hint_aug_algo import patch_mask

    mask = patch_mask(torch.tensor([[4]]), (2, 3), (4, 5))  # patch 4 = row 1, column 1
    expected = torch.zeros(1, 1, 8, 15)
    expected[..., 4:8, 5:10] = 1
    assert torch.equal(mask, expected)


def test_refuses_token_reduction_in_training():
    model = make_variant("plain")
    vk.augment(model, "hint-aug", start_epoch=0)
    vk.accelerate(model, "tome", r=4)
    with pytest.raises(NotImplementedError, match="hint-aug: block 2 sees"):
        mix_batch(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_student_equal_to_teacher_gives_zero_drift():
    model = make_variant("registers")
    vk.augment(model, "hint-aug", start_epoch=0, threshold=0.0)  # any drift > 0 would choose the teacher branch
    hook = model.__dict__["_vitkit_augment"]["hint-aug"]
    mix_batch(model, torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2]))
    hook.set_epoch(1)
    assert hook.drift_rates == [(0, 0.0)]
