"""vk.load: timm names, local files in several key layouts, inference of the architecture, clear errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vitkit as vk
from vitkit.models.loading import CheckpointMismatchError, HubUnreachableError
from conftest import CIFAR_JPEG, SHAMAIL, SMMK47, VARIANTS, make_variant, require


def _same_outputs(a, b, atol=1e-6):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("fmt", ["safetensors", "pth-wrapped"])
def test_timm_layout_files_infer_the_architecture(name, fmt, tmp_path):
    model = make_variant(name)
    sd = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:  # a training checkpoint with DDP prefixes
        path = tmp_path / "w.pth"
        torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in sd.items()}}, path)
    heads = {} if name == "qk_norm" else {"num_heads": 4}  # heads are inferable from qk-norm weights only
    loaded = vk.load(path, **heads)
    assert loaded.num_prefix_tokens == model.num_prefix_tokens and loaded.global_pool == model.global_pool
    _same_outputs(loaded, model)


def test_arch_given_loads_strictly(tmp_path):
    model = vk.load("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = vk.load(path, arch="vit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=1e-6, rtol=0)


def test_new_head_when_num_classes_differs(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(make_variant("plain").state_dict(), str(path))
    assert vk.load(path, num_heads=4, num_classes=3).head.out_features == 3


def _to_hf_vit(sd: dict, depth: int) -> dict:
    """Write a timm state dict in Hugging Face ViTForImageClassification names (the inverse of the converter)."""
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
             "norm1": "layernorm_before", "norm2": "layernorm_after"}
    for i in range(depth):
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            for part, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"vit.encoder.layer.{i}.attention.attention.{part}.{kind}"] = t
            for timm_name, hf_name in names.items():
                out[f"vit.encoder.layer.{i}.{hf_name}.{kind}"] = sd[f"blocks.{i}.{timm_name}.{kind}"]
    return out


def test_huggingface_vit_layout(tmp_path):
    model = make_variant("plain", qkv_bias=True)
    path = tmp_path / "model.safetensors"
    save_file(_to_hf_vit(model.state_dict(), depth=6), str(path))
    inferred = vk.load(path, num_heads=4)  # HF's default LayerNorm eps (1e-12) is assumed
    assert inferred.__dict__["_vitkit_base"]["layout"] == "huggingface-vit" and inferred.norm.eps == 1e-12
    _same_outputs(vk.load(path, num_heads=4, norm_eps=1e-6), model)  # the source model's eps, given


def test_smmk47_post_norm_checkpoint_is_refused():
    with pytest.raises(ValueError, match="post-norm"):
        vk.load(require(SMMK47))


def test_corrupt_file_names_the_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(make_variant("plain").state_dict(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth.*truncated or corrupt"):
        vk.load(bad)
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="broken.safetensors.*truncated or corrupt"):
        vk.load(bad_st)


def test_key_mismatch_lists_keys_and_counts(tmp_path):
    sd = make_variant("plain").state_dict()
    sd.pop("blocks.0.norm1.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: blocks\.0\.norm1\.weight; 1 unexpected: "
                                                      r"blocks\.0\.extra\.weight"):
        vk.load(path, arch="vit_tiny_patch16_224", **{k: v for k, v in dict(
            img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4).items()})


def test_offline_hub_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="hub is unreachable.*vk.load\\('path/to/model.safetensors'"):
        vk.load("vit_tiny_patch16_224.augreg_in21k", pretrained=True)


def test_unknown_timm_name():
    with pytest.raises(ValueError, match="unknown timm model `vit_tinyy_patch16_224`"):
        vk.load("vit_tinyy_patch16_224", pretrained=False)


def test_shamail_loads_strictly_and_says_what_it_inferred(caplog):
    with caplog.at_level(logging.INFO, logger="vitkit"):
        model = vk.load(require(SHAMAIL), num_heads=4)
    assert "torch-multihead-attention layout" in caplog.text and "8x8 grid" in caplog.text
    assert sum(p.numel() for p in model.parameters()) == 811_146
    assert model.blocks[0].attn.num_heads == 4 and model.norm.eps == 1e-5


def _cifar_batches(batch_size=500):
    classes = sorted(p.name for p in require(CIFAR_JPEG).iterdir())
    order = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert sorted(order) == classes
    files = [(f, label) for label, c in enumerate(order) for f in sorted((CIFAR_JPEG / c).glob("*.jpg"))]
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f, _ in chunk])
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - 0.5) / 0.5
        yield x, torch.tensor([label for _, label in chunk])


@pytest.mark.slow
def test_shamail_top1_on_cifar_jpegs():
    model = vk.load(require(SHAMAIL), num_heads=4).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in _cifar_batches():
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert total == 10_000
    assert abs(correct / total - 0.518) <= 0.005, f"top-1 {correct / total:.4f}, expected 0.518 ± 0.005"


def test_save_writes_only_changed_tensors_and_refuses_another_base(tmp_path):
    base_file = tmp_path / "base.safetensors"
    save_file(make_variant("plain", seed=0).state_dict(), str(base_file))
    model = vk.load(base_file, num_heads=4)
    vk.adapt(model, "linear")
    with torch.no_grad():
        model.head.weight.add_(1.0)
    out = vk.save(model, tmp_path / "run")
    manifest = json.loads((out / "vitkit.json").read_text())
    assert manifest["tensors"] == ["head.weight"] and manifest["weights"] == "changed"
    assert manifest["base"]["sha256"] and manifest["methods"] == [{"name": "linear", "config": {"lr": 1e-3, "weight_decay": 1e-4}}]
    _same_outputs(vk.load(out), model)
    other = tmp_path / "other.safetensors"
    save_file(make_variant("plain", seed=1).state_dict(), str(other))
    with pytest.raises(ValueError, match="not the same weights"):
        vk.io.load_dir(out, base=other, num_heads=4)


def test_embedded_model_and_its_random_twin(tmp_path):
    pretrained = vk.load("vitkit/vit-tiny-cifar")
    twin = vk.load("vitkit/vit-tiny-cifar", pretrained=False)
    assert [p.shape for p in twin.parameters()] == [p.shape for p in pretrained.parameters()]
    assert not torch.equal(twin.pos_embed, pretrained.pos_embed)
    vk.save(twin, tmp_path / "twin")  # a random base is saved whole and reloads exactly
    _same_outputs(vk.load(tmp_path / "twin"), twin)


def test_a_new_untrained_head_is_saved_and_reloads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(make_variant("plain").state_dict(), str(path))
    model = vk.load(path, num_heads=4, num_classes=3)  # random 3-class head over pretrained weights
    vk.save(model, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "vitkit.json").read_text())
    assert manifest["tensors"] == ["head.bias", "head.weight"]
    _same_outputs(vk.load(tmp_path / "run"), model)


def test_embedded_model_refuses_an_architecture_argument_that_contradicts_its_entry():
    with pytest.raises(ValueError, match=r"trained with num_heads=4; num_heads=8 was given"):
        vk.load("vitkit/vit-tiny-cifar", num_heads=8)
    assert len(vk.load("vitkit/vit-tiny-cifar", num_heads=4).blocks) == 6  # the stated value is accepted
