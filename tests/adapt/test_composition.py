"""Adapters on one model: vpt + lora (+ adaptformer) train together and save/load; later methods keep what
earlier ones train."""
from __future__ import annotations

import json

import pytest
import torch

import vitkit as vk
from conftest import SHAMAIL, make_variant, require


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", [("vpt", "lora"), ("lora", "vpt")])
def test_later_methods_keep_earlier_trainables(order):
    model = make_variant("registers")
    for name in order:
        vk.adapt(model, name, **({"deep": True} if name == "vpt" else {}))
    names = trainable_names(model)
    assert "vpt.prompts" in names and any("lora_A" in n for n in names) and "head.weight" in names
    assert all(n == "vpt.prompts" or "lora_" in n or n.startswith("head.") for n in names)


def test_vpt_lora_adaptformer_train_and_save_load(tmp_path):
    """On the real CIFAR ViT (a fingerprinted base): three adapters train together; the save holds only them."""
    torch.manual_seed(0)
    model = vk.load(require(SHAMAIL), num_heads=4, num_classes=10)
    vk.adapt(model, "vpt", num_prompts=4, deep=True)
    vk.adapt(model, "lora", rank=4)
    vk.adapt(model, "adaptformer", bottleneck=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    model.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == set(before), sorted(set(before) - moved)[:5]
    model.eval()
    saved = vk.save(model, tmp_path / "composed")
    keys = json.loads((saved / "vitkit.json").read_text())["tensors"]
    assert set(keys) == set(before), sorted(set(keys) ^ set(before))[:5]
    loaded = vk.load(saved).eval()
    assert [a.name for a in vk.applied(loaded)] == ["vpt", "lora", "adaptformer"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_lora_then_ssf_merge_to_plain_timm(images):
    """SSF wraps the LoRA layers; merging LoRA, then SSF, gives a plain timm model with the same outputs."""
    from timm.models.vision_transformer import VisionTransformer

    from vitkit.adapt import lora, ssf

    model = make_variant("registers")
    vk.adapt(model, "lora", targets=("q", "v", "mlp"))
    vk.adapt(model, "ssf")
    assert any("lora_" in n for n in trainable_names(model)) and any("ssf_" in n for n in trainable_names(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        out = model(images)
        with pytest.raises(NotImplementedError, match="ssf: cannot merge into a QKVLoRA"):
            ssf.merge(model)  # refused before any change
        torch.testing.assert_close(model(images), out, atol=0, rtol=0)
        merged = ssf.merge(lora.merge(model))
        torch.testing.assert_close(merged(images), out, atol=1e-5, rtol=1e-5)
    assert type(merged) is VisionTransformer and vk.applied(merged) == []


@pytest.mark.parametrize("targets", [("q", "v"), ("qkv",), ("mlp",)])
def test_lora_after_ssf_refused(targets):
    model = vk.adapt(make_variant("plain"), "ssf")
    with pytest.raises(ValueError, match=r"lora: blocks.0.\S+ is a SSF, not a Linear; apply lora before"):
        vk.adapt(model, "lora", targets=targets)


@pytest.mark.parametrize("first,kwargs", [("vpt", dict(deep=True)), ("lora", {}), ("lora", dict(targets=("qkv",))),
                                          ("adaptformer", {}), ("ssf", {}), ("bitfit", {})])
def test_linear_after_an_adapter_keeps_it_trainable(first, kwargs):
    """`linear` freezes the backbone, not what an earlier method trains (issue 11.10)."""
    model = vk.adapt(make_variant("registers"), first, **kwargs)
    before = trainable_names(model)
    vk.adapt(model, "linear")
    assert trainable_names(model) == before, sorted(before ^ trainable_names(model))[:5]
    assert {"head.weight", "head.bias"} < before


def test_linear_alone_and_after_accelerate_trains_the_head_only():
    model = vk.adapt(make_variant("plain"), "linear")
    assert trainable_names(model) == {"head.weight", "head.bias"}
    model = vk.accelerate(make_variant("plain"), "tome", r=2)
    assert trainable_names(vk.adapt(model, "linear")) == {"head.weight", "head.bias"}


def test_ssf_merge_over_peft_lora_refused_naming_peft(images):
    from vitkit.adapt import ssf

    model = vk.adapt(vk.adapt(make_variant("plain"), "lora", targets=("mlp",)), "ssf")
    with pytest.raises(NotImplementedError, match=r"ssf: cannot merge into a Linear \(PEFT\) \(blocks.0.mlp.fc1\); "
                                                  r"merge the method applied before ssf first"):
        ssf.merge(model)
    assert sum(isinstance(m, ssf.SSF) for m in model.modules()) == len(ssf.sites(model))
