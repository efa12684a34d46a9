"""PVP: the downstream model starts from the source's saved modules bit-exactly (fresh head, another class count),
its logits equal a hand-written VPT-deep forward with the source prompts, refusals, save/load without the source."""
from __future__ import annotations

import shutil

import pytest
import torch

import vitkit as vk
from conftest import TINY, make_variant
from vit_oracle import base_tensors, vit_forward


def _target(num_classes: int):
    """The source's backbone with a new head of `num_classes` (as vk.load(name, num_classes=...) gives)."""
    model = make_variant("plain")
    model.reset_classifier(num_classes)
    return model


def _trained_source(tmp_path, *chain):
    """A source model with `chain` applied, its trainable tensors moved (as training would), saved."""
    source = make_variant("plain")
    for name, cfg in chain:
        vk.adapt(source, name, **cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    vk.save(source, tmp_path / "source")
    return source


def test_downstream_starts_from_saved_prompts_exactly(tmp_path, images):
    source = _trained_source(tmp_path, ("vpt", {"deep": True, "num_prompts": 4}))
    target = _target(5)
    head = {k: v.clone() for k, v in target.head.state_dict().items()}
    vk.adapt(target, "pvp", init_from=str(tmp_path / "source"))
    assert torch.equal(target.vpt.prompts, source.vpt.prompts)
    assert all(torch.equal(target.head.state_dict()[k], v) for k, v in head.items()), "the head was transferred"
    assert {n for n, p in target.named_parameters() if p.requires_grad} == {"vpt.prompts", "head.weight", "head.bias"}

    prompts = source.vpt.prompts.detach()  # oracle: deep prompts replace each other after the prefix, per block

    def before_block(i, t, p):
        rest = t[:, p:] if i == 0 else t[:, p + prompts.shape[1]:]
        return torch.cat([t[:, :p], prompts[i].expand(t.shape[0], -1, -1), rest], dim=1)

    with torch.no_grad():
        expected = vit_forward(base_tensors(target), images, heads=TINY["num_heads"], before_block=before_block,
                               num_prompts=prompts.shape[1])
        torch.testing.assert_close(target.eval()(images), expected, atol=1e-5, rtol=1e-5)


def test_lora_and_bitfit_modules_transfer(tmp_path):
    source = _trained_source(tmp_path, ("lora", {"rank": 2}), ("bitfit", {}))
    target = vk.adapt(_target(3), "pvp", init_from=str(tmp_path / "source"))
    src = {n: p for n, p in source.named_parameters() if p.requires_grad and not n.startswith("head.")}
    got = dict(target.named_parameters())
    assert src and all(torch.equal(got[n], p) for n, p in src.items())
    assert target.head.weight.shape == (3, TINY["embed_dim"])


def test_save_load_without_the_source_folder(tmp_path, images):
    _trained_source(tmp_path, ("vpt", {"deep": True}))
    target = vk.adapt(_target(5), "pvp", init_from=str(tmp_path / "source"))
    vk.save(target, tmp_path / "target")
    shutil.rmtree(tmp_path / "source")
    loaded = vk.load(tmp_path / "target", num_classes=5).eval()  # reset_classifier is not recorded
    assert vk.applied(loaded)[0].config.init_from == "" and "vpt" in vk.applied(loaded)[0].config.chain
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), target.eval()(images), atol=1e-6, rtol=1e-6)


def test_plain_init_baseline_builds_the_chain():
    model = vk.adapt(make_variant("plain"), "pvp", chain='[{"name": "lora", "config": {"rank": 2}}]')
    assert hasattr(model.blocks[0].attn.qkv, "base_layer") and not hasattr(model, "vpt")


def test_refuses_another_backbone(tmp_path):
    _trained_source(tmp_path, ("vpt", {"deep": True}))
    with pytest.raises(ValueError, match="pvp: the source modules were trained on another backbone"):
        vk.adapt(make_variant("plain", seed=1), "pvp", init_from=str(tmp_path / "source"))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"init_from": "no/such/folder"}, FileNotFoundError, "pvp: `init_from`='no/such/folder' is not a vk.save folder"),
    ({"chain": "[{"}, ValueError, "pvp: `chain` must be a JSON list"),
    ({"chain": '[{"name": "tome"}]'}, ValueError, "pvp: `chain` holds `tome`, a accelerate method"),
])
def test_bad_settings_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        vk.adapt(make_variant("plain"), "pvp", **kwargs)


def test_source_without_adaptation_is_refused(tmp_path):
    vk.save(vk.accelerate(make_variant("plain"), "tome", r=1), tmp_path / "plain")
    with pytest.raises(ValueError, match="pvp: .* has no adaptation method applied"):
        vk.adapt(make_variant("plain"), "pvp", init_from=str(tmp_path / "plain"))
