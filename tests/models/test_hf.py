"""Hugging Face ViT checkpoints: the config.json beside the weights is used (heads, eps, size, classes), the
head count is never guessed, transformers-5 `state_dict()` names load, and logits equal transformers' own."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import vitkit as vk

transformers = pytest.importorskip("transformers")


def _hf_model(heads=2, eps=1e-6, labels=3, act="gelu", seed=0):
    """A tiny ViTForImageClassification whose head dim (32) is not 64, built offline from a config."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                                    intermediate_size=128, image_size=32, patch_size=4, num_labels=labels,
                                    layer_norm_eps=eps, hidden_act=act)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: move them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "bias" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def _vk_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_save_pretrained_folder_uses_config_json(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)  # model.safetensors (transformers 4 names) + config.json
    model = vk.load(tmp_path / "model.safetensors")  # no num_heads: config.json says 2
    assert model.blocks[0].attn.num_heads == 2 and model.norm.eps == 1e-6 and model.num_classes == 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_vk_logits(model, x), _hf_logits(hf, x), atol=1e-5, rtol=0)
    folder = vk.load(tmp_path)  # the save_pretrained folder itself
    torch.testing.assert_close(_vk_logits(folder, x), _hf_logits(hf, x), atol=1e-5, rtol=0)


def test_transformers5_state_dict_names_load(tmp_path):
    hf = _hf_model(act="gelu_pytorch_tanh")
    keys = list(hf.state_dict())
    assert any(".layers.0.attention.q_proj." in k for k in keys)  # transformers 5 in-memory names
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    hf.config.save_pretrained(tmp_path)
    model = vk.load(tmp_path / "sd.safetensors")
    assert model.__dict__["_vitkit_base"]["layout"] == "huggingface-vit-v5"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_vk_logits(model, x), _hf_logits(hf, x), atol=1e-5, rtol=0)


def test_without_config_the_head_count_is_asked_for(tmp_path):
    hf = _hf_model()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match=r"head count cannot be inferred .* pass num_heads="):
        vk.load(tmp_path / "sd.safetensors")
    with pytest.warns(UserWarning, match="LayerNorm eps assumed 1e-12"):
        model = vk.load(tmp_path / "sd.safetensors", num_heads=2, act_layer="gelu")
    assert model.blocks[0].attn.num_heads == 2


def test_plain_timm_weights_without_num_heads_are_refused(tmp_path):
    from conftest import make_variant

    save_file(make_variant("plain").state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"w.safetensors: the head count cannot be inferred .*width 64.*num_heads=1"):
        vk.load(tmp_path / "w.safetensors")


def test_a_config_that_contradicts_the_weights_is_refused(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    with pytest.raises(ValueError, match="states embed_dim=96 but the tensors have 64"):
        vk.load(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_labels": 5, "id2label": None}))
    with pytest.raises(ValueError, match="states 5 classes but the checkpoint head has 3"):
        vk.load(tmp_path / "model.safetensors")


def test_given_num_heads_against_the_config_warns(tmp_path):
    _hf_model().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="`num_heads=4` given, but config.json .* states 2"):
        model = vk.load(tmp_path / "model.safetensors", num_heads=4)
    assert model.blocks[0].attn.num_heads == 4


def test_preprocessor_config_gives_the_data_config(tmp_path):
    _hf_model().save_pretrained(tmp_path)
    transformers.ViTImageProcessor(image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2],
                                   size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    cfg = vk.data.data_config(vk.load(tmp_path / "model.safetensors"))
    assert cfg["mean"] == (0.4, 0.4, 0.4) and cfg["std"] == (0.2, 0.2, 0.2) and cfg["interpolation"] == "bilinear"


def test_timm_hub_config_json_names_the_architecture(tmp_path):
    from conftest import TINY

    model = vk.load("vit_tiny_patch16_224", pretrained=False, **TINY)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 10,
        "model_args": {k: v for k, v in TINY.items() if k != "num_classes"},
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is assumed
        loaded = vk.load(tmp_path / "model.safetensors")
    assert vk.data.data_config(loaded)["mean"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_vk_logits(loaded, x), _vk_logits(model, x), atol=1e-6, rtol=0)
