"""DINO objective: the teacher gets no gradient, the EMA step is exact, the loss (centring, sharpening) matches a
plain-torch oracle, the centre update, the collapse monitor, and every conformance variant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import VARIANTS, make_variant
from vitkit.pretrain import dino

SMALL = dict(output_dim=32, hidden_dim=32, bottleneck_dim=16, global_views=2, local_views=1)


def build(name="plain", **cfg):
    torch.manual_seed(0)
    model = make_variant(name)
    return model, dino.Objective(model, dino.Config(**{**SMALL, **cfg}))


def test_wrapping_leaves_the_model_unchanged_and_the_teacher_starts_equal():
    model = make_variant("registers")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = dino.Objective(model, dino.Config(**SMALL))
    assert obj.model is model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(obj.teacher.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(obj.teacher_head.state_dict()[k], v) for k, v in obj.head.state_dict().items())


def test_no_gradient_reaches_the_teacher():
    model, obj = build()
    loss, _ = obj(torch.randn(2, 3, 3, 32, 32))
    loss.backward()
    teacher = [*obj.teacher.parameters(), *obj.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher), "a teacher parameter has a gradient"
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, "the student got no gradient"
    assert obj.head.layers[0].weight.grad.abs().sum() > 0


def test_ema_step_is_exact():
    model, obj = build(momentum=0.9)
    with torch.no_grad():  # student and teacher apart, so the step is visible
        for p in [*model.parameters(), *obj.head.parameters()]:
            p.add_(torch.randn_like(p))
    t_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    h_before = {k: v.clone() for k, v in obj.teacher_head.state_dict().items()}
    step, total = 4, 10
    obj.after_step(step, total)
    i = step - 1  # the paper's per-iteration cosine: m_i = 1 - (1 - m0)·(cos(π·i/(T-1)) + 1)/2
    m = 1 - (1 - 0.9) * (math.cos(math.pi * i / (total - 1)) + 1) / 2
    for got, before, student in ((obj.teacher, t_before, model), (obj.teacher_head, h_before, obj.head)):
        s = dict(student.named_parameters())
        for k, p in got.named_parameters():
            torch.testing.assert_close(p, m * before[k] + (1 - m) * s[k], rtol=0, atol=1e-6)


def oracle_dino_loss(student_out, teacher_out, center, t_temp, s_temp):
    """Cross-entropy between the centred, sharpened teacher softmax of each global view and the student softmax
    of every other view, averaged over pairs and images (Caron et al., 2021, Alg. 1 with multi-crop)."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher_out):
        p_t = F.softmax((t - center) / t_temp, dim=-1)
        for j, s in enumerate(student_out):
            if i == j:
                continue
            total = total + (-(p_t * F.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()
            pairs += 1
    return total / pairs


def test_loss_centre_and_temperatures_match_the_oracle():
    model, obj = build(center_momentum=0.8, warmup_teacher_temp=0.03, teacher_temp=0.07, teacher_temp_warmup=0.5,
                       head_batch_norm=False)  # per-view head calls below: batch statistics would differ
    with torch.no_grad():
        obj.criterion.center.normal_()  # a centre that matters
        for p in model.parameters():  # student != teacher
            p.add_(0.1 * torch.randn_like(p))
    obj.step.fill_(2), obj.total_steps.fill_(8)  # 2 of the 4 warm-up steps: teacher temperature 0.05
    views = torch.randn(3, 3, 3, 32, 32)  # (B, V, C, H, W): 2 global + 1 local
    center = obj.criterion.center.clone()

    def head_of(vit, head, x):
        return head(vit.forward_head(vit.forward_features(x), pre_logits=True))

    with torch.no_grad():
        student = [head_of(model, obj.head, views[:, v]) for v in range(3)]
        teacher = [head_of(obj.teacher, obj.teacher_head, views[:, v]) for v in range(2)]
        want = oracle_dino_loss(student, teacher, center, 0.05, 0.1)
        loss, stats = obj(views)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    want_center = 0.8 * center + 0.2 * torch.cat(teacher).mean(0)  # EMA of the teacher's batch mean
    torch.testing.assert_close(obj.criterion.center, want_center.reshape(center.shape), rtol=1e-5, atol=1e-6)
    p = F.softmax((torch.cat(teacher) - center.reshape(1, -1)) / 0.05, dim=-1)
    h = -(p * p.log()).sum(-1).mean() / math.log(32)
    assert stats["teacher_entropy"] == pytest.approx(float(h), rel=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains(name):
    model, obj = build(name)
    loss, stats = obj(torch.randn(2, 3, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and 0 < stats["teacher_entropy"] <= 1 and 0 < stats["teacher_batch_entropy"] <= 1
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: block 0 got no gradient"


def test_refuses_bad_settings():
    with pytest.raises(ValueError, match="dino: needs at least 2 views"):
        dino.Config(global_views=1, local_views=0)
    with pytest.raises(ValueError, match="dino: `momentum` must be in"):
        dino.Config(momentum=1.5)
    _, obj = build()
    with pytest.raises(ValueError, match=r"dino: expects views \(B, V, C, H, W\)"):
        obj(torch.randn(2, 3, 32, 32))


def test_collapse_is_diagnosed_from_the_monitor():
    _, obj = build()
    assert "nearly uniform" in obj.diagnose({"teacher_entropy": 0.99, "teacher_batch_entropy": 0.99})
    assert "same output" in obj.diagnose({"teacher_entropy": 0.01, "teacher_batch_entropy": 0.01})
    assert obj.diagnose({"teacher_entropy": 0.4, "teacher_batch_entropy": 0.7}) is None


def test_last_layer_is_frozen_during_the_first_steps():
    """The paper's recipe: the head's last layer does not train in the first epoch (here the first
    `freeze_last_layer` of the steps); oracle: its effective weight g·v/|v| (row-wise) is the initial one through a
    real AdamW step with weight decay, while the rest of the head trains, and it moves once the window is over."""
    model, obj = build(freeze_last_layer=0.5)
    trainable = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.04)

    def last_weight():
        g, v = obj.head.last_layer.weight_g, obj.head.last_layer.weight_v
        return (g * v / v.norm(dim=1, keepdim=True)).detach().clone()

    start, first = last_weight(), obj.head.layers[0].weight.detach().clone()
    moved = []
    for step in range(1, 5):  # 4 steps, the first 2 frozen
        loss, _ = obj(torch.randn(4, 3, 3, 32, 32))
        loss.backward()
        opt.step()
        opt.zero_grad()
        obj.after_step(step, 4)
        moved.append(not torch.allclose(last_weight(), start, rtol=0, atol=1e-6))
    assert moved == [False, False, True, True], moved
    assert not torch.equal(obj.head.layers[0].weight, first), "the rest of the head did not train"


@pytest.mark.parametrize("settings, uniform", [({}, False), (dict(head_batch_norm=False), True)])
def test_teacher_is_not_uniform_on_nearly_parallel_features(settings, uniform):
    """A pretrained ViT on a new domain gives nearly parallel features (mean cosine 0.96 for the embedded CIFAR
    model on digits). Without batch norm in the head (the earlier default) the head maps them to nearly the same
    output, the centre removes it, and the sharpened rest is uniform from the first steps: no signal, the
    benchmark's collapse (0.999 of log K here). With it (the default) the per-image entropy stays well below log K
    (0.69 here) once the centre has settled."""
    torch.manual_seed(0)
    model = make_variant("plain")
    with torch.no_grad():
        model.norm.bias.add_(3 * torch.randn_like(model.norm.bias))  # a common direction in every feature
    obj = dino.Objective(model, dino.Config(local_views=0, **settings))
    images = torch.randn(16, 3, 32, 32)
    f = F.normalize(dino.features(model, images), dim=1)
    assert (f @ f.T).mean() > 0.9, "the fixture's features are not nearly parallel"
    obj.step.fill_(10), obj.total_steps.fill_(10)  # past the temperature warm-up
    views = torch.stack([images, images + 0.1 * torch.randn_like(images)], 1)
    with torch.no_grad():  # the settled centre: the teacher's mean output (what its EMA converges to)
        teacher = obj.teacher_head(dino.features(obj.teacher, views.flatten(0, 1)))
        obj.criterion.center.copy_(teacher.mean(0).reshape(obj.criterion.center.shape))
        _, stats = obj(views)
    assert (stats["teacher_entropy"] > 0.95) == uniform, stats


def test_distribute_syncs_the_heads_batch_norm_on_gpus_only(caplog):
    """Under torchrun each process sees its share of the batch; the DINO code syncs the heads' batch norm. On
    GPUs `distribute` converts student and teacher heads (same parameter tensors, so the optimizer built before
    still trains them, and the same output where nothing is distributed); on the CPU it warns and leaves them."""
    _, obj = build()
    feats = torch.randn(6, obj.model.embed_dim)
    want = obj.head(feats)  # train mode: batch statistics
    params = [id(p) for p in obj.parameters()]
    obj.distribute(1, torch.device("cuda"))  # one process: nothing to sync
    obj.distribute(2, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in obj.modules())
    assert ("batch norm (head.layers.1, head.layers.4, teacher_head.layers.1, teacher_head.layers.4) normalises over "
            "each process's 1/2 of the batch") in caplog.text
    obj.distribute(2, torch.device("cuda"))  # a GPU device object: converting needs no GPU
    synced = [n for n, m in obj.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced == ["head.layers.1", "head.layers.4", "teacher_head.layers.1", "teacher_head.layers.4"]
    assert [id(p) for p in obj.parameters()] == params
    torch.testing.assert_close(obj.head(feats), want)  # not initialised: SyncBatchNorm falls back to batch_norm


def test_fit_hands_the_objective_its_world_and_device(monkeypatch, tmp_path):
    import numpy as np

    import vitkit as vk

    calls = []
    monkeypatch.setattr(dino.Objective, "distribute", lambda self, world, device: calls.append((world, device.type)))
    rng = np.random.default_rng(0)
    data = vk.data.arrays(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), [0, 1, 0, 1])
    vk.pretrain(make_variant("plain"), data, "dino", epochs=1, batch_size=4, out_dir=tmp_path, progress=False,
                **SMALL)
    assert calls == [(1, "cpu")]
