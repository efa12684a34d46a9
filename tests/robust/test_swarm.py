"""SWARM audit (spec robust.md R3): the switch off is the plain VPT exactly; the switch on is a plain-torch
forward with `[cls | prompts | s | patches]` (tests/adapt/vit_oracle.py, no vitkit code); each phase trains only
its own set; the trigger stays inside its bound after every step; bad input gets one clear error."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import vitkit as vk
from conftest import make_variant
from vitkit.robust import swarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapt"))
from vit_oracle import base_tensors, vit_forward  # noqa: E402

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def vpt_model(n=3, seed=0, variant="plain"):
    model = make_variant(variant, seed=seed)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    vk.adapt(model, "vpt", num_prompts=n)
    with torch.no_grad():
        model.vpt.prompts.normal_(0, 1.0)  # prompts that matter
    return model.eval()


def with_switch(model, **cfg):
    out = swarm.install(copy.deepcopy(model), swarm.Config(**cfg), torch.Generator().manual_seed(0))
    with torch.no_grad():
        out.swarm.switch.normal_(0, 2.0)  # a switch that matters
    return out


def test_switch_off_equals_the_plain_vpt_and_switch_on_equals_the_oracle(images):
    plain = vpt_model()
    model = with_switch(plain)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images)), "switch off must be the plain VPT exactly"
        with swarm.switched(model, True):
            on = model(images)
        sd, p, s = base_tensors(plain), plain.vpt.prompts[0], model.swarm.switch

        def insert(i, t, num_prefix):  # [cls | prompts | s | patches] before block 0
            return torch.cat([t[:, :num_prefix], p.expand(len(t), -1, -1), s.expand(len(t), -1, -1),
                              t[:, num_prefix:]], 1) if i == 0 else t
        expected = vit_forward(sd, images, heads=4, before_block=insert, num_prompts=4)
    torch.testing.assert_close(on, expected, atol=1e-5, rtol=1e-5)
    assert (on - plain(images)).abs().max() > 1e-3, "the switch must change the output in this case (>> atol)"


@pytest.mark.parametrize("variant", ["registers", "no_cls_avg", "reg_no_cls", "layerscale"])
def test_switch_off_is_the_plain_vpt_and_on_changes_the_output_on_every_variant(variant, images):
    plain = vpt_model(variant=variant)
    model = with_switch(plain)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
        with swarm.switched(model, True):
            on = model(images)
            assert model.forward_features(images).shape == plain.forward_features(images).shape  # s stripped
    assert (on - plain(images)).abs().max() > 1e-4


def test_each_phase_trains_only_its_own_set():
    model = with_switch(vpt_model()).train()
    model.set_grad_checkpointing(True)  # the switched-on forward must not be recomputed with the switch reset
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    params = {"prompts": model.vpt.prompts, "switch": model.swarm.switch, "trigger": model.swarm.trigger,
              "head": model.head.weight}
    expected = {"clean_mode_loss": {"prompts", "trigger", "head"}, "backdoor_mode_loss": {"switch", "trigger", "head"}}
    for phase, trained in expected.items():
        grads = torch.autograd.grad(getattr(swarm, phase)(model, x, y), list(params.values()), allow_unused=True)
        got = {k for k, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
        assert got == trained, f"{phase}: gradients reach {sorted(got)}, expected {sorted(trained)}"
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if n.startswith("blocks.") or n.startswith("patch_embed."))


def test_switch_tokens_sit_after_the_prompts_and_distillation_skips_them():
    model = with_switch(vpt_model(n=2))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, off = swarm.tokens(model, x, on=False)
        _, on = swarm.tokens(model, x, on=True)
    assert off.shape[1] == 1 + 2 + 64 and on.shape[1] == 1 + 2 + 1 + 64
    with torch.no_grad():  # distill weight 0 and 1: the difference is the MSE of aligned tokens (cls, prompts, patches)
        model.swarm.distill_weight = 0.0
        ce = swarm.backdoor_mode_loss(model.eval(), x, torch.tensor([1, 2]))
        model.swarm.distill_weight = 1.0
        both = swarm.backdoor_mode_loss(model, x, torch.tensor([1, 2]))
        _, on = swarm.tokens(model, x, on=True)
    aligned = ((torch.cat([on[:, :3], on[:, 4:]], 1) - off) ** 2).mean()
    torch.testing.assert_close(both - ce, aligned, atol=1e-6, rtol=1e-5)


def test_audit_keeps_the_trigger_in_its_bound_and_reports_every_figure(tmp_path):
    model = make_variant("plain")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(24, 3, 32, 32, generator=g)
    data = torch.utils.data.TensorDataset((pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1),
                                          torch.arange(24) % 3)
    before = copy.deepcopy(model.state_dict())
    result = vk.audit(model, data, data, num_prompts=2, epochs=2, lr=0.05, batch_size=8, baseline=False,
                      out_dir=tmp_path, progress=False, poison_fraction=0.25)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not vk.applied(model)
    tau, bound = result.model.swarm.trigger, result.model.swarm.bound
    assert (tau.abs() <= bound + 1e-7).all() and torch.isclose(tau.abs(), bound.expand_as(tau)).any(), \
        "the trigger must be projected onto |τ| <= ε/σ and reach the bound at lr 0.05"
    report = result.report()
    for key in ("clean_acc_off", "clean_acc_on", "asr_off", "asr_on", "target_rate_off"):
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    assert report["detection"]["on"]["n_triggered"] == 6 and 0 <= report["detection"]["off"]["auroc"] <= 1
    assert "| SWARM | on |" in result.table()


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="badnets"), "audit: unknown method `badnets`"),
    (dict(target=10), r"swarm: `target` must be a class of the model's head, in \[0, 10\)"),
    (dict(eps=-1.0), "swarm: `eps` must be >= 0"),
    (dict(num_prompts=0), "swarm: `num_prompts` must be >= 1"),
])
def test_bad_input_is_one_clear_error(kwargs, match, tmp_path):
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=match):
        vk.audit(make_variant("plain"), data, data, out_dir=tmp_path, **kwargs)


def test_images_of_another_size_are_refused(tmp_path):
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))
    small = torch.utils.data.TensorDataset(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"swarm: test images are \(3, 16, 16\) but the model's input"):
        vk.audit(make_variant("plain"), data, small, out_dir=tmp_path)


def test_an_adapted_model_is_refused(tmp_path):
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="swarm: `model` already has methods applied \\(vpt\\)"):
        vk.audit(vpt_model(), data, data, out_dir=tmp_path)
