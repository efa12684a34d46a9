"""The aliases `vpt-deep` (= `vpt` with deep=True) and `lora-qkv` (= `lora` with targets=('qkv',)): registered
methods of their own (API, CLI, save/load) that build exactly the model their target builds with those fields."""
from __future__ import annotations

import pytest
import torch

import vitkit as vk
from conftest import make_variant
from vitkit.adapt import lora

ALIASES = [
    pytest.param("vpt-deep", "vpt", dict(deep=True, num_prompts=3), id="vpt-deep"),
    pytest.param("lora-qkv", "lora", dict(targets=("qkv",), rank=2), id="lora-qkv"),
]


@pytest.mark.parametrize("alias,target,fields", ALIASES)
def test_alias_builds_the_target_with_its_fields(alias, target, fields, images):
    method = vk.registry.get(alias)
    assert method.kind == "adapt" and method.apply is vk.registry.get(target).apply
    defaults = {name: default for name, _, default, _ in method.fields()}
    pinned = {k: v for k, v in fields.items() if k in ("deep", "targets")}
    assert {k: defaults[k] for k in pinned} == pinned
    assert method.doc.startswith(f"Alias of `{target}`")
    extra = {k: v for k, v in fields.items() if k not in pinned}
    a, b = make_variant("registers"), make_variant("registers")
    vk.adapt(a, alias, **extra)
    vk.adapt(b, target, **fields)
    torch.manual_seed(3)
    with torch.no_grad():  # the same trainable tensors, moved off the identity, give the same logits
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert (na, pa.shape, pa.requires_grad) == (nb, pb.shape, pb.requires_grad)
            if pa.requires_grad:
                pa.copy_(torch.randn_like(pa) * 0.05)
                pb.copy_(pa)
        torch.testing.assert_close(a(images), b(images), atol=0, rtol=0)
    assert [e.name for e in vk.applied(a)] == [alias]
    assert vk.applied(a)[0].config == vk.registry.make_config(method, **extra)


def test_alias_field_overrides_and_bad_alias():
    cfg = vk.registry.make_config(vk.registry.get("vpt-deep"), deep=False)
    assert cfg.deep is False  # an alias only changes defaults
    with pytest.raises(ValueError, match="alias `x`: \\['nope'\\] are not fields"):
        vk.registry.alias("x", of="vpt", nope=1)


def test_lora_qkv_merge_keeps_its_record(images):
    model = make_variant("plain")
    vk.adapt(model, "lora-qkv", rank=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        before = model(images)
        lora.merge(model, unload=False)
        assert vk.applied(model)[0].name == "lora-qkv" and vk.applied(model)[0].config.merged
        torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)
        lora.merge(lora.unmerge(model))
        assert vk.applied(model) == []
