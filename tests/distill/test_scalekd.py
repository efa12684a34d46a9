"""ScaleKD's loss assembly (distill.md C1) against a plain-torch oracle that walks both ViTs by hand; gradients
reach the projectors through the teacher's blocks and never the teacher; ViT -> CNN; refusals."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import TINY
from vitkit.distill.base import Teacher
from vitkit.distill.scalekd import Config, ScaleKDLoss


def walk(model, x):
    """Every block's output (B, N, C) of a timm ViT, walked by hand."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []
    for blk in model.blocks:
        t = blk(t)
        outs.append(t)
    return outs


def grid(tokens, g):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)


def oracle(mod, student, teacher, x, y):
    """The spec's total loss: (1-α)CE + α KL + stage 3 + perception + stage 4 (both views each)."""
    n = lambda f: f / f.norm(dim=1, keepdim=True)  # noqa: E731
    centre = lambda f: f - f.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    B = x.shape[0]

    def views(qs, qf, target):
        spat = 0.08 * ((n(grid(qs, 8)) - n(target)) ** 2).sum() / B
        return spat + 0.06 * ((n(centre(grid(qf, 8))) - n(centre(target))) ** 2).sum() / B

    L, Ls, P = len(teacher.blocks), len(student.blocks), teacher.num_prefix_tokens
    a, a_s = math.ceil(3 * L / 4), math.ceil(3 * Ls / 4)
    with torch.no_grad():
        t_outs = walk(teacher, x)
        z_t = teacher.head(teacher.norm(t_outs[-1])[:, 0])
    s_outs = walk(student, x)
    z_s = student.head(student.norm(s_outs[-1])[:, 0])
    s3, s4 = grid(s_outs[a_s - 1][:, 1:], 8), grid(s_outs[-1][:, 1:], 8)
    T3, T4, Tn = (grid(t[:, P:], 8) for t in (t_outs[a - 1], t_outs[-1], teacher.norm(t_outs[-1])))
    kl = (F.softmax(z_t, -1) * (F.log_softmax(z_t, -1) - F.log_softmax(z_s, -1))).sum() / B
    loss = 0.5 * F.cross_entropy(z_s, y) + 0.5 * kl
    qs, qf = mod.p3_spatial(s3), mod.p3_frequency(s3)
    loss = loss + views(qs, qf, T3)

    def through(q, prefix, blocks, norm):
        t = torch.cat([prefix, q], 1)
        for blk in blocks:
            t = blk(t)
        return (teacher.norm(t) if norm else t)[:, P:]

    qs, qf = (through(q, t_outs[a - 1][:, :P], teacher.blocks[a:], False) for q in (qs, qf))
    loss = loss + views(qs, qf, T4)
    os_, of = (through(o, t_outs[-1][:, :P], [], True) for o in (mod.p4_spatial(s4, qs), mod.p4_frequency(s4, qf)))
    return loss + views(os_, of, Tn)


def models():
    torch.manual_seed(0)
    teacher = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, "embed_dim": 128, "depth": 6}).eval()
    student = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 4})
    return teacher, student


def test_total_loss_against_oracle_and_gradients():
    teacher, student = models()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    guide = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3))
    mod = ScaleKDLoss(Config(), guide, student, x[:2])
    assert (mod.t3, mod.t4, mod.s_idx) == (4, 5, (2, 3))  # ceil(3L/4) - 1 and L - 1
    step = mod(student, guide, x, y)
    torch.testing.assert_close(step.loss, oracle(mod, student, teacher, x, y), atol=1e-4, rtol=1e-4)
    step.loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    for proj in (mod.p3_spatial, mod.p3_frequency, mod.p4_spatial, mod.p4_frequency):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters() if p.requires_grad)
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_perception_gradient_flows_through_teacher_blocks():
    """With the logit and direct terms off, stage-3 projectors learn only through the teacher's stage-4 blocks."""
    teacher, student = models()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    guide = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3))
    mod = ScaleKDLoss(Config(alpha=1.0), guide, student, x[:2])
    qs = mod.p3_spatial(mod.p3_spatial.kv_proj[0].weight.new_zeros(8, 64, 8, 8))
    target = torch.randn(8, 128, 8, 8)
    out = mod._teacher_blocks(teacher, qs, torch.zeros(8, 1, 128), mod.t3 + 1, mod.t4 + 1, False)
    (out.transpose(1, 2).reshape(8, 128, 8, 8) - target).pow(2).sum().backward()
    assert mod.p3_spatial.query.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_vit_teacher_to_cnn_student_trains(tmp_path):
    teacher, _ = models()
    torch.manual_seed(0)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    result = vk.distill(teacher, student, data, method="scalekd", epochs=1, batch_size=8, out_dir=tmp_path,
                        progress=False)
    assert math.isfinite(result.history[-1]["train_loss"]) and (tmp_path / "model" / "vitkit.json").is_file()


def test_refuses_a_cnn_teacher():
    _, student = models()
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    with pytest.raises(NotImplementedError, match="scalekd: the teacher must be a timm VisionTransformer"):
        ScaleKDLoss(Config(), Teacher(cnn, ((0.5,) * 3, (0.5,) * 3)), student, torch.randn(2, 3, 32, 32))


def test_the_same_seed_gives_the_same_student(tmp_path):
    """The projectors are built inside vk.distill from its seed, not from whatever the global RNG holds."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    students = []
    for run, noise in enumerate((0, 1)):
        teacher, student = models()
        torch.manual_seed(100 + noise)  # a different global RNG state before each call
        vk.distill(teacher, student, data, method="scalekd", epochs=1, batch_size=8, seed=3,
                   out_dir=tmp_path / str(run), progress=False)
        students.append(student.state_dict())
    for key, value in students[0].items():
        torch.testing.assert_close(students[1][key], value, rtol=0, atol=0, msg=key)
