"""`kd` (spec C0) and the distillation machinery: oracles written from the spec in plain torch, the CE
equivalence at α = 0, the frozen teacher, ViT → CNN, save/load, bench backbone, CLI."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import vitkit as vk
from vitkit import cli
from vitkit.distill import Teacher, get, methods
from vitkit.distill.kd import Config, KDLoss

from conftest import CIFAR_JPEG, VARIANTS, make_variant, require

T_ARGS = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
S_ARGS = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def models(seed=0, **student_extra):
    torch.manual_seed(seed)
    teacher = vk.load("vit_tiny_patch16_224", **T_ARGS)
    with torch.no_grad():  # a confident teacher: its soft targets differ clearly from uniform and from the labels
        teacher.head.weight.mul_(20)
    student = vk.load("vit_tiny_patch16_224", **{**S_ARGS, **student_extra})
    return teacher, student


def digits(student, n=32, train=False):
    return vk.data.Subset(vk.data.digits(), list(range(n))).with_transform(vk.data.transform(student, train=train))


RUN = dict(epochs=1, batch_size=8, progress=False, warmup_epochs=0.0)


# ------------------------------------------------------------------------------------- oracles (spec C0)
def oracle_kd(z_s, z_t, y, alpha, T, hard):
    """(1 − α)·CE(z_s, y) + α·T²·KL(p_t^T ‖ p_s^T), batch mean; hard: α·CE(z_s, argmax z_t)."""
    ce = -torch.log_softmax(z_s, -1).gather(1, y[:, None]).mean()
    if hard:
        return (1 - alpha) * ce + alpha * -torch.log_softmax(z_s, -1).gather(1, z_t.argmax(-1)[:, None]).mean()
    p_t = torch.softmax(z_t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(z_s / T, -1))).sum(-1).mean()
    return (1 - alpha) * ce + alpha * T * T * kl


@pytest.mark.parametrize("alpha,T,hard", [(0.7, 3.0, False), (1.0, 2.0, False), (0.4, 1.0, True)])
def test_kd_loss_matches_the_plain_torch_oracle(alpha, T, hard):
    teacher, student = models()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 9])
    cfg = Config(alpha=alpha, temperature=T, hard=hard)
    guide = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3))
    step = KDLoss(cfg, guide, student, x[:2])(student, guide, x, y)
    # the teacher's view re-normalised by hand from the data's mean/std (0.5) to the model's (ImageNet defaults)
    mean, std = (torch.tensor(teacher.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    z_t = teacher((x * 0.5 + 0.5 - mean) / std)
    expected = oracle_kd(student(x), z_t, y, alpha, T, hard)
    torch.testing.assert_close(step.loss, expected, rtol=1e-5, atol=1e-6)


def test_kd_gradient_is_the_closed_form():
    """∂(T²·KL)/∂z_s = T·(p_s^T − p_t^T) per sample (batch mean → /B); 0 at z_s = z_t."""
    from vitkit.distill.losses import kd_kl

    T, z_t = 3.0, torch.randn(5, 10) * 4
    z_s = (torch.randn(5, 10) * 4).requires_grad_()
    kd_kl(z_s, z_t, T).backward()
    expected = T * (torch.softmax(z_s.detach() / T, -1) - torch.softmax(z_t / T, -1)) / 5
    torch.testing.assert_close(z_s.grad, expected, rtol=1e-5, atol=1e-7)
    same = z_t.clone().requires_grad_()
    value = kd_kl(same, z_t, T)
    value.backward()
    assert abs(value.item()) < 1e-6 and same.grad.abs().max() < 1e-6


def test_kd_term_agrees_with_torchdistill_where_its_alpha_is_nonzero():
    """torchdistill's KDLoss weights CE with its alpha (= 1 − α here) and KL with beta = α (see kd.py)."""
    from torchdistill.losses.mid_level import KDLoss as TDKD

    from vitkit.distill.losses import kd_kl

    z_s, z_t, y = torch.randn(6, 10), torch.randn(6, 10) * 3, torch.randint(0, 10, (6,))
    ours = 0.3 * F.cross_entropy(z_s, y) + 0.7 * kd_kl(z_s, z_t, 4.0)
    theirs = TDKD("s", "o", "t", "o", temperature=4.0, alpha=0.3, beta=0.7)({"s": {"o": z_s}}, {"t": {"o": z_t}}, y)
    torch.testing.assert_close(ours, theirs)


def test_feature_hint_matches_oracle_and_is_zero_for_identity_projector():
    teacher, student = models()
    x = torch.randn(4, 3, 32, 32)
    guide = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3))
    loss = KDLoss(Config(alpha=0.0, feature_weight=2.0), guide, student, x[:2])
    step = loss(student, guide, x, torch.zeros(4, dtype=torch.long))
    # oracle: student block-2 output as a grid (B, 32, 4, 4), 1x1 projection, MSE with the teacher's (B, 64, 4, 4)
    tokens = student.blocks(student._pos_embed(student.patch_embed(x)))[:, 1:]
    f_s = tokens.transpose(1, 2).reshape(4, 32, 4, 4)
    w, b = loss.projector.weight[:, :, 0, 0], loss.projector.bias
    proj = torch.einsum("oc,bchw->bohw", w, f_s) + b[None, :, None, None]
    t_tokens = teacher.blocks(teacher._pos_embed(teacher.patch_embed(guide.input(x))))[:, 1:]
    f_t = t_tokens.transpose(1, 2).reshape(4, 64, 4, 4)
    ce = F.cross_entropy(student(x), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(step.loss, ce + 2.0 * ((proj - f_t) ** 2).mean(), rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(teacher)  # the same features on both sides, identity projector -> hint 0
    same = KDLoss(Config(alpha=0.0, feature_weight=1.0), Teacher(twin, ((0.5,) * 3, (0.5,) * 3)), twin, x[:2])
    with torch.no_grad():
        same.projector.weight.copy_(torch.eye(64)[:, :, None, None]), same.projector.bias.zero_()
    f = torch.randn(2, 64, 4, 4)
    assert same.hint(f, f).item() == 0.0


# ------------------------------------------------------------------------------ training through vk.fit
def test_kd_with_weight_zero_equals_ce_training_step_for_step(tmp_path):
    teacher, student = models()
    ce_student, kd_student, half_student = (copy.deepcopy(student) for _ in range(3))
    data = digits(student, train=True)  # random augmentation: both runs must draw the same views
    ce = vk.fit(ce_student, data, out_dir=tmp_path / "ce", **RUN)
    kd = vk.distill(teacher, kd_student, data, "kd", alpha=0.0, out_dir=tmp_path / "kd", **RUN)
    for (name, a), b in zip(ce_student.state_dict().items(), kd_student.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between CE and KD(alpha=0)"
    assert ce.history[0]["train_loss"] == kd.history[0]["train_loss"]
    vk.distill(teacher, half_student, data, "kd", alpha=0.5, out_dir=tmp_path / "half", **RUN)  # control
    assert not torch.equal(half_student.head.weight, ce_student.head.weight)


def test_teacher_gets_no_gradient_stays_in_eval_and_unchanged(tmp_path):
    teacher, student = models()
    teacher = vk.load("vit_tiny_patch16_224", **{**T_ARGS, "drop_rate": 0.5, "proj_drop_rate": 0.5})
    teacher.train()  # the caller left it in training mode, with dropout: distill must switch it off
    before = copy.deepcopy(teacher.state_dict())
    modes = []
    teacher.blocks[-1].register_forward_hook(lambda m, i, o: modes.append((m.training, torch.is_grad_enabled())))
    vk.distill(teacher, student, digits(student), "kd", feature_weight=1.0, out_dir=tmp_path, **RUN)
    assert modes and all(m == (False, False) for m in modes), modes
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["model"] and all(k.startswith(("student.", "loss.projector.")) for k in ckpt["model"])
    assert any(k.startswith("loss.projector.") for k in ckpt["model"])


def test_vit_teacher_cnn_student_with_feature_hint_saves_and_loads(tmp_path):
    teacher, _ = models()
    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=10)  # timm's tiny ResNet (0.37 M parameters)
    data = vk.data.Subset(vk.data.digits(), range(16)).with_transform(vk.data.transform(cnn, input_size=(3, 32, 32)))
    result = vk.distill(teacher, cnn, data, "kd", feature_weight=1.0, out_dir=tmp_path, **RUN)
    assert result.history[0]["train_loss"] > 0 and result.config["distill"]["method"] == "kd"
    # vk.load builds ViTs only: a CNN save (whole, as vitkit did not load it) reloads onto its architecture
    loaded = vk.load(tmp_path / "model", base=timm.create_model("test_resnet", num_classes=10)).eval()
    x = torch.stack([data[i][0] for i in range(4)])
    torch.testing.assert_close(loaded(x), cnn.eval()(x))


def test_distilled_student_is_a_bench_backbone(tmp_path):
    from vitkit.bench import bench

    root = require(CIFAR_JPEG)
    teacher, student = models()
    data = vk.data.image_folder(root)
    small = vk.data.Subset(data, [i for c in range(3) for i in range(c * 1000, c * 1000 + 8)])
    vk.distill(teacher, student, small.with_transform(vk.data.transform(student)), "kd", out_dir=tmp_path / "kd",
               **RUN)
    folder = tmp_path / "imgs"
    for i in small.indices:
        target = folder / data.files[i].relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.files[i].read_bytes())
    recipe = {"backbones": [{"name": "distilled", "source": str(tmp_path / "kd" / "model")}],
              "tasks": [{"name": "t", "root": str(folder), "train": 5, "eval": 3}], "protocols": ["knn"],
              "chains": [], "perf": False}
    result = bench(recipe, out=tmp_path / "bench")
    rows = [r for r in result.rows if r["backbone"] == "distilled"]
    assert rows and all(r.get("acc") is not None for r in rows), rows


# ----------------------------------------------------------------------------------------- registry, CLI
def test_registry_lists_methods_with_help_and_refuses_unknown_names():
    names = [m.name for m in methods()]
    assert {"kd", "logit-cache"} <= set(names)
    assert vk.distill.methods() == methods()
    assert all(h for m in methods() for *_, h in m.fields())
    with pytest.raises(ValueError, match="did you mean `kd`"):
        get("kdd")


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=1.5), "kd: `alpha` must be in"),
    (dict(alphaa=0.5), "unknown config field"),
    (dict(temperature=0), "`temperature` must be > 0"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    teacher, student = models()
    with pytest.raises((ValueError, TypeError), match=message):
        vk.distill(teacher, student, digits(student, n=4), "kd", **kwargs)


def test_class_count_mismatch_is_refused():
    teacher, student = models(num_classes=5)
    with pytest.raises(ValueError, match="teacher has 10 classes and the student 5"):
        vk.distill(teacher, student, digits(student, n=4), "kd")


def test_cli_help_lists_methods_and_bad_value_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "kd:" in out and "logit-cache:" in out and "temperature=1.0" in out
    code = cli.main(["distill", "vit_tiny_patch16_224", "vit_tiny_patch16_224", "--data", "digits",
                     "--teacher-arg", "pretrained=false", "--set", "alpha=2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "alpha" in err, err


@pytest.mark.parametrize("name", list(VARIANTS) + ["grad_checkpointing"])
def test_feature_kd_on_every_conformance_variant(name):
    """Registers, no class token, LayerScale, qk-norm (conftest.VARIANTS) and gradient checkpointing: the hint
    reads the patch grid (prefix tokens removed) and gradients reach the student."""
    teacher, _ = models()
    student = make_variant("plain" if name == "grad_checkpointing" else name).train()
    student.set_grad_checkpointing(name == "grad_checkpointing")
    x = torch.randn(4, 3, 32, 32)
    guide = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3))
    loss = KDLoss(Config(feature_weight=1.0), guide, student, x[:2])
    step = loss(student, guide, x, torch.tensor([1, 2, 3, 4]))
    step.loss.backward()
    assert torch.isfinite(step.loss) and student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert loss.projector.weight.grad.abs().sum() > 0


def test_saved_student_loads_with_another_class_count_as_a_new_head(tmp_path):
    """How `vitkit bench` loads a backbone: vk.load(folder, num_classes=task classes) keeps a new head."""
    _, student = models()
    vk.save(student, tmp_path / "s")
    back = vk.load(tmp_path / "s", num_classes=3)
    assert back.head.out_features == 3
    assert torch.equal(back.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)
