"""PEFT adapter folders both ways: vk.save(format="peft") is read by PEFT's own PeftModel.from_pretrained with
the same logits, and vk.load reads a folder written by PEFT's own save_pretrained. The oracle is PEFT itself."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import vitkit as vk
from conftest import TINY

TOL = 1e-5


def _base(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 3, **kw}).eval()


def _train_like(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))

CASES = [
    pytest.param(dict(), id="default-q-v-slices"),
    pytest.param(dict(targets=("q", "k", "v"), rank=3, alpha=6.0), id="q-k-v-slices"),
    pytest.param(dict(targets=("v",), rank=2, alpha=1.0), id="v-slice"),
    pytest.param(dict(targets=("q", "v", "mlp"), rank=4, alpha=4.0), id="slices-and-peft-mlp"),
    pytest.param(dict(targets=("qkv", "proj"), rank=4, alpha=16.0), id="peft-qkv-proj"),
    pytest.param(dict(targets=("qkv",), peft_kwargs={"use_rslora": True}), id="rslora"),
    pytest.param(dict(targets=("qkv",), train_head=False), id="frozen-head"),
]


@pytest.mark.parametrize("cfg", CASES)
def test_vitkit_lora_loads_in_peft_with_the_same_logits(cfg, tmp_path):
    model = vk.adapt(_base(), "lora", **cfg)
    _train_like(model)
    assert (_logits(model, X) - _logits(_base(), X)).abs().max() > 0.05  # the adapter changes the output
    vk.save(model, tmp_path / "a", format="peft")
    peft_model = PeftModel.from_pretrained(_base(), tmp_path / "a")
    torch.testing.assert_close(_logits(peft_model, X), _logits(model, X), atol=TOL, rtol=0)
    back = vk.load(tmp_path / "a", base=_base())  # and back into vitkit
    torch.testing.assert_close(_logits(back, X), _logits(model, X), atol=TOL, rtol=0)


def test_q_v_slices_become_a_rank_2r_block_lora_on_qkv(tmp_path):
    model = _train_like(vk.adapt(_base(), "lora", rank=4, alpha=8.0))
    vk.save(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    assert config["modules_to_save"] == ["head"]
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    qkv = model.blocks[0].attn.qkv
    a, b = t["base_model.model.blocks.0.attn.qkv.lora_A.weight"], t["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    D = 64
    torch.testing.assert_close(a, torch.cat([qkv.lora_A["q"].weight, qkv.lora_A["v"].weight]))
    torch.testing.assert_close(b[:D, :4], qkv.lora_B["q"].weight)
    torch.testing.assert_close(b[2 * D:, 4:], qkv.lora_B["v"].weight)
    assert b[D:2 * D].abs().max() == 0 and b[:D, 4:].abs().max() == 0 and b[2 * D:, :4].abs().max() == 0


def test_a_folder_written_by_peft_loads_in_vitkit(tmp_path):
    peft_model = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"],
                                                    modules_to_save=["head"]))
    _train_like(peft_model)
    peft_model.save_pretrained(tmp_path / "p")
    model = vk.load(tmp_path / "p", base=_base())
    assert [a.name for a in vk.applied(model)] == ["lora"]
    torch.testing.assert_close(_logits(model, X), _logits(peft_model, X), atol=TOL, rtol=0)
    vk.save(model, tmp_path / "v")  # a vitkit model from then on
    torch.testing.assert_close(_logits(vk.load(tmp_path / "v", base=_base()), X), _logits(peft_model, X),
                               atol=TOL, rtol=0)


def test_a_vitkit_peft_folder_refuses_another_base(tmp_path):
    vk.save(_train_like(vk.adapt(_base(), "lora")), tmp_path / "a", format="peft")
    with pytest.raises(ValueError, match="not the same weights"):
        vk.load(tmp_path / "a", base=_base(seed=1))


@pytest.mark.parametrize("method, match", [("vpt", "vpt have no PEFT adapter form"),
                                           ("ssf", "ssf have no PEFT adapter form"),
                                           ("bitfit", "bitfit have no PEFT adapter form")])
def test_methods_without_a_peft_form_are_named(method, match, tmp_path):
    model = vk.adapt(_base(), method)
    with pytest.raises(NotImplementedError, match=match):
        vk.save(model, tmp_path / "a", format="peft")


def test_merged_lora_is_refused(tmp_path):
    from vitkit.adapt import lora

    model = _train_like(vk.adapt(_base(), "lora"))
    lora.merge(model, unload=False)
    with pytest.raises(ValueError, match="merged into their Linears .* unmerge"):
        vk.save(model, tmp_path / "a", format="peft")


def test_unknown_format_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="`format` must be 'vitkit' or 'peft', got 'onnx'"):
        vk.save(_base(), tmp_path / "a", format="onnx")


def test_a_peft_adapter_on_a_conv_is_refused_by_name(tmp_path):
    peft_model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["proj"]))  # also patch_embed.proj (Conv2d)
    peft_model.save_pretrained(tmp_path / "p")
    with pytest.raises(NotImplementedError, match=r"targets patch_embed.proj \(Conv2d\), which vitkit's lora does "
                                                  "not wrap"):
        vk.load(tmp_path / "p", base=_base())
