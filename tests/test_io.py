"""vk.save / vk.load(folder): reload with other class counts and kwargs, all-or-nothing saves, saves of models
vitkit did not load, preprocessing that travels with the model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitkit as vk
from vitkit import io
from conftest import SHAMAIL, TINY, make_variant, require


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _perturb(model, scale=0.1, seed=3):
    """Move every trainable tensor, as training would (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# --- 11.4: a model with a new head and timm kwargs reloads as saved ------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 3, 17])
def test_embedded_model_with_a_new_head_and_kwargs_reloads(num_classes, tmp_path):
    model = vk.load("vitkit/vit-tiny-cifar", num_classes=num_classes, dynamic_img_size=True)
    vk.adapt(model, "lora")
    _perturb(model)
    vk.save(model, tmp_path / "m")
    back = vk.load(tmp_path / "m")
    assert back.head.out_features == num_classes and back.dynamic_img_size
    x = torch.randn(2, 3, 40, 40)  # dynamic size: another input size than 32
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-6, rtol=0)


def test_embedded_random_twin_with_a_new_head_reloads(tmp_path):
    twin = vk.load("vitkit/vit-tiny-cifar", pretrained=False, num_classes=4)
    vk.save(twin, tmp_path / "twin")
    back = vk.load(tmp_path / "twin")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(back, x), _logits(twin, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(num_classes=7), dict(num_classes=1, dynamic_img_size=True),
                                    dict(num_classes=10, drop_path_rate=0.1)], ids=["7cls", "1cls-dynamic", "10cls-dp"])
def test_file_and_timm_bases_reload_with_their_kwargs(kwargs, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(make_variant("plain").state_dict(), str(path))
    model = vk.load(path, num_heads=4, **kwargs)
    vk.adapt(model, "lora", rank=2)
    _perturb(model)
    vk.save(model, tmp_path / "file")
    back = vk.load(tmp_path / "file")
    assert back.head.out_features == kwargs["num_classes"]
    assert back.dynamic_img_size == kwargs.get("dynamic_img_size", False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-6, rtol=0)
    timm_model = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs})
    vk.save(timm_model, tmp_path / "timm")
    back = vk.load(tmp_path / "timm")
    assert back.dynamic_img_size == kwargs.get("dynamic_img_size", False)
    torch.testing.assert_close(_logits(back, x), _logits(timm_model, x), atol=1e-6, rtol=0)


# --- 12.8: a save is all-or-nothing ----------------------------------------------------------------------------

def _two_saves(tmp_path):
    model = vk.load("vitkit/vit-tiny-cifar")
    vk.adapt(model, "lora")
    _perturb(model, seed=1)
    vk.save(model, tmp_path / "m")
    first = _logits(model, torch.ones(1, 3, 32, 32))
    _perturb(model, seed=2)
    return model, first


def test_a_crash_between_the_two_writes_keeps_the_previous_save(tmp_path, monkeypatch):
    model, first = _two_saves(tmp_path)

    write_text = Path.write_text

    def crash(self, *args, **kwargs):
        if "vitkit.json" in self.name:  # the manifest is written second, after weights.safetensors
            raise KeyboardInterrupt("killed after weights.safetensors was written")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        vk.save(model, tmp_path / "m")
    monkeypatch.undo()
    torch.testing.assert_close(_logits(vk.load(tmp_path / "m"), torch.ones(1, 3, 32, 32)), first, atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_without_an_atomic_exchange_the_second_save_replaces_the_first(tmp_path, monkeypatch):
    model, first = _two_saves(tmp_path)
    monkeypatch.setattr(io, "_exchange", lambda a, b: False, raising=False)  # file systems without renameat2
    vk.save(model, tmp_path / "m")
    torch.testing.assert_close(_logits(vk.load(tmp_path / "m"), torch.ones(1, 3, 32, 32)),
                               _logits(model, torch.ones(1, 3, 32, 32)), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_weights_file_changed_after_the_save_is_refused(tmp_path):
    _two_saves(tmp_path)
    other = tmp_path / "other"
    model = vk.load("vitkit/vit-tiny-cifar")
    vk.adapt(model, "lora")
    vk.save(model, other)
    (tmp_path / "m" / "weights.safetensors").write_bytes((other / "weights.safetensors").read_bytes())
    with pytest.raises(ValueError, match="weights.safetensors is not the file vitkit.json was written with"):
        vk.load(tmp_path / "m")


def test_save_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not part of a save \(notes.txt\)"):
        vk.save(vk.load("vitkit/vit-tiny-cifar"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- 11.14: a model vitkit did not load ------------------------------------------------------------------------

def _timm_model(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 2, **kw}).eval()


def test_a_timm_model_adapted_and_saved_loads_back_onto_its_base(tmp_path):
    model = _timm_model()
    vk.adapt(model, "lora")
    _perturb(model)
    vk.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "vitkit.json").read_text())
    assert manifest["base"]["kind"] == "module" and manifest["weights"] == "changed"
    assert manifest["base"]["name"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert all("lora_" in k or k.startswith("head.") for k in manifest["tensors"])  # the adapter alone
    base = _timm_model()
    back = vk.load(tmp_path / "m", base=base)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-6, rtol=0)
    assert not vk.applied(base)  # the base passed is copied, not changed
    with pytest.raises(ValueError, match="not the same weights; tensors different values: blocks.0"):
        vk.load(tmp_path / "m", base=_timm_model(seed=1))


def test_a_plain_timm_model_is_saved_whole(tmp_path):
    model = _timm_model()
    vk.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "vitkit.json").read_text())["weights"] == "full"
    back = vk.load(tmp_path / "m", base=_timm_model(seed=5))  # any base of the architecture: all is saved
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-6, rtol=0)


def test_base_with_methods_applied_is_refused(tmp_path):
    model = _timm_model()
    vk.adapt(model, "lora")
    vk.save(model, tmp_path / "m")
    with pytest.raises(ValueError, match="the base already has methods applied \\(lora\\)"):
        vk.load(tmp_path / "m", base=model)


# --- 11.15: preprocessing travels with the model ---------------------------------------------------------------

def test_mean_std_given_at_load_are_used_saved_and_restored(tmp_path):
    model = vk.load(require(SHAMAIL), num_heads=4, mean=0.5, std=(0.5, 0.5, 0.5))
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    cfg = vk.data.data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 1.0
    normalize = [t for t in vk.data.transform(model).transforms[-1].transforms if type(t).__name__ == "Normalize"]
    assert normalize and list(normalize[0].mean.tolist()) == [0.5, 0.5, 0.5]
    vk.adapt(model, "lora")
    vk.save(model, tmp_path / "m")
    assert vk.data.data_config(vk.load(tmp_path / "m"))["mean"] == (0.5, 0.5, 0.5)
    assert vk.data.data_config(vk.load(tmp_path / "m", mean=0.4))["mean"] == (0.4, 0.4, 0.4)


def test_embedded_data_config_can_be_overridden_at_load():
    assert vk.data.data_config(vk.load("vitkit/vit-tiny-cifar"))["std"] == (0.5, 0.5, 0.5)
    cfg = vk.data.data_config(vk.load("vitkit/vit-tiny-cifar", std=0.25, interpolation="bilinear"))
    assert cfg["std"] == (0.25, 0.25, 0.25) and cfg["interpolation"] == "bilinear"


@pytest.mark.parametrize("kwargs, match", [(dict(std=0.0), "`std` must be > 0"),
                                           (dict(mean=(0.5, 0.5)), "`mean` has 2 values but the model takes 3"),
                                           (dict(interpolation="cubic"), "`interpolation` must be")])
def test_bad_preprocessing_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.load("vitkit/vit-tiny-cifar", **kwargs)


def test_a_timm_model_save_without_base_needs_the_hub_or_a_base(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    model = _timm_model()
    vk.adapt(model, "lora")
    vk.save(model, tmp_path / "m")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vk.models.HubUnreachableError, match=r"pass the base: vk.load\(.*, base=model\)"):
        vk.load(tmp_path / "m")


def test_shamail_without_num_heads_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match=r"best_vit.pth: the head count cannot be inferred .*num_heads="):
        vk.load(require(SHAMAIL))


def test_save_into_an_existing_empty_folder_and_through_a_symlink(tmp_path):
    model = vk.load("vitkit/vit-tiny-cifar")
    (tmp_path / "empty").mkdir()
    vk.save(model, tmp_path / "empty")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    vk.save(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "vitkit.json").is_file()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(vk.load(tmp_path / "link"), x), _logits(model, x), atol=1e-6, rtol=0)


def test_cli_train_on_a_two_class_folder_then_info(tmp_path, capsys):
    """The issue's reproduction: `vitkit train vitkit/vit-tiny-cifar --data <2 classes> --method lora`, then
    `vitkit info <out>/model` (failed with "not the same weights": the recorded num_classes was dropped)."""
    from vitkit.cli import main
    from conftest import CIFAR_JPEG

    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for f in sorted((require(CIFAR_JPEG) / c).glob("*.jpg"))[:8]:
            (tmp_path / "data" / c / f.name).symlink_to(f)
    assert main(["train", "vitkit/vit-tiny-cifar", "--data", str(tmp_path / "data"), "--method", "lora",
                 "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress",
                 "--model-arg", "dynamic_img_size=True"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run" / "model")]) == 0
    out = capsys.readouterr().out
    assert "258 head" in out and "dynamic size" in out  # 2 classes: 128 x 2 + 2; dynamic_img_size kept


@pytest.mark.parametrize("value", ["x", 2.5, -1, True])
def test_a_model_argument_that_is_not_a_whole_number_is_named(value):
    with pytest.raises(ValueError, match=r"model argument `num_heads` must be a whole number >= 0"):
        vk.load("vitkit/vit-tiny-cifar", num_heads=value)


def test_cli_model_argument_that_is_not_a_number_is_one_line(capsys):
    from vitkit import cli

    code = cli.main(["info", "vitkit/vit-tiny-cifar", "--model-arg", "num_heads=x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "`num_heads`" in err, err


# --- a head changed with model.reset_classifier after vk.load is rebuilt by vk.load(folder) -------------------

def _reset_after(model, *args):
    model.reset_classifier(*args)
    return model


@pytest.mark.parametrize("make", [
    lambda: _perturb(_reset_after(vk.adapt(vk.load("vitkit/vit-tiny-cifar"), "adaptformer"), 7)),  # adapt, then a head
    lambda: _perturb(vk.adapt(_reset_after(vk.load("vitkit/vit-tiny-cifar"), 5, "avg"), "linear")),  # other pool
    lambda: _reset_after(vk.adapt(vk.load("vitkit/vit-tiny-cifar"), "bitfit"), 0),  # features only
    lambda: _reset_after(make_variant("registers"), 3),  # a random base, saved whole
    lambda: _reset_after(timm.create_model("test_resnet", num_classes=10).eval(), 3),  # a CNN (pooling: a module)
    # not loaded by vitkit, token pooling -> avg: its final norm stays `norm` (not `fc_norm`) and must be rebuilt so
    lambda: _reset_after(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10).eval(), 5, "avg"),
], ids=["adaptformer-then-7", "5-avg-then-linear", "0-classes", "random-whole", "cnn", "timm-token-to-avg"])
def test_a_head_reset_after_load_is_saved_and_rebuilt(make, tmp_path):
    """Before the fix vk.load(folder) rebuilt the base's head and failed with a shape mismatch."""
    model = make()
    vk.save(model, tmp_path / "m")
    back = vk.load(tmp_path / "m")
    assert (back.num_classes, str(back.global_pool)) == (model.num_classes, str(model.global_pool))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), atol=1e-6, rtol=0)
    other = vk.load(tmp_path / "m", num_classes=4)  # another class count asked for: a new head, the same pooling
    assert (other.get_classifier().out_features, str(other.global_pool)) == (4, str(model.global_pool))
