"""vk.pretrain / vitkit pretrain: the result is the same timm model (saves and loads as one), only the backbone
trains (at its own low lr, head untouched), the run resumes exactly through vk.fit, and bad input is one line."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch

import vitkit as vk
from tests.conftest import TINY, VARIANTS, make_variant
from vitkit import cli, data
from vitkit.pretrain import get_objective, objectives

FAST = {"mae": {}, "dino": dict(output_dim=32, hidden_dim=32, bottleneck_dim=16, local_views=0)}


def tiny_data(n=16):
    rng = np.random.default_rng(0)
    return data.arrays(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), [i % 2 for i in range(n)])


def test_registry_lists_the_objectives_with_help_on_every_field():
    names = [e.name for e in objectives()]
    assert {"mae", "dino"} <= set(names)
    for entry in objectives():
        assert all(help_ for *_, help_ in entry.fields()), f"{entry.name}: a field without help"
        assert entry.config().backbone_lr < entry.config().lr, f"{entry.name}: backbone lr not below the heads'"


@pytest.mark.parametrize("objective", ["mae", "dino"])
def test_result_is_a_plain_timm_model_that_saves_and_loads(objective, tmp_path):
    model = make_variant("registers")
    keys = list(model.state_dict())
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = vk.pretrain(model, tiny_data(), objective, epochs=1, batch_size=8, out_dir=tmp_path / "run",
                      progress=False, **FAST[objective])
    assert out is model and list(model.state_dict()) == keys  # same model, same keys: nothing added or left
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items()), "the classifier head moved"
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"]), "nothing trained"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad was not restored"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, **VARIANTS["registers"]).eval()
    plain.load_state_dict(model.state_dict(), strict=True)  # a plain timm model takes the weights as they are
    loaded = vk.load(tmp_path / "run" / "model").eval()  # the run's vk.save folder (a bench backbone)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_backbone_trains_at_its_own_lower_lr():
    model = make_variant("plain")
    entry = get_objective("mae")
    obj = entry.objective(model, entry.config(lr=1e-3, backbone_lr=2e-5))
    scales = {n: obj.lr_scale(n) for n, _ in obj.named_parameters()}
    assert scales["encoder.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.02)
    assert scales["decoder_embed.weight"] == 1.0 and scales["decoder.blocks.0.attn.qkv.weight"] == 1.0
    assert "encoder.vit.pos_embed" in obj.no_weight_decay()


def test_an_adapter_limits_what_trains(tmp_path):
    model = vk.adapt(make_variant("plain"), "bitfit")
    weight, bias = model.blocks[0].mlp.fc1.weight.clone(), model.blocks[0].mlp.fc1.bias.clone()
    vk.pretrain(model, tiny_data(8), "mae", epochs=1, batch_size=8, out_dir=tmp_path, progress=False)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, weight), "a weight frozen by bitfit moved"
    assert not torch.equal(model.blocks[0].mlp.fc1.bias, bias), "bitfit's bias did not train"


@pytest.mark.parametrize("objective", ["mae", "dino"])
def test_resume_after_interruption_equals_uninterrupted(objective, tmp_path):
    class Stop(Exception):
        pass

    def stop(metrics):
        raise Stop

    kwargs = dict(epochs=2, batch_size=8, progress=False, **FAST[objective])
    straight, first, resumed = make_variant("plain"), make_variant("plain"), make_variant("plain")
    vk.pretrain(straight, tiny_data(), objective, out_dir=tmp_path / "a", **kwargs)
    with pytest.raises(Stop):  # interrupted after epoch 1; a new process resumes from its checkpoint
        vk.pretrain(first, tiny_data(), objective, out_dir=tmp_path / "b", on_epoch_end=stop, **kwargs)
    vk.pretrain(resumed, tiny_data(), objective, out_dir=tmp_path / "b", resume=True, **kwargs)
    a, b = straight.state_dict(), resumed.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed {objective} differs from the uninterrupted run by {worst}"


def test_bad_input_is_a_clear_error(tmp_path):
    model = make_variant("plain")
    with pytest.raises(ValueError, match="pretrain: unknown objective `mea`; did you mean `mae`"):
        vk.pretrain(model, tiny_data(), "mea")
    with pytest.raises(TypeError, match="mae: unknown config field"):
        vk.pretrain(model, tiny_data(), "mae", temperature=0.1)
    with pytest.raises(ValueError, match="backbone_lr"):
        vk.pretrain(model, tiny_data(), "mae", backbone_lr=0.0)
    with pytest.raises(TypeError, match="pretrain: `data` must be a vitkit dataset"):
        vk.pretrain(model, [1, 2], "mae")


def test_cli_help_run_and_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pretrain", "--help"])
    assert exit_.value.code == 0 and "mask_ratio=0.75" in capsys.readouterr().out
    out = tmp_path / "run"
    assert cli.main(["pretrain", "vitkit/vit-tiny-cifar", "--data", "digits", "--split", "train=2", "--epochs", "1",
                     "--batch-size", "10", "--out", str(out), "--no-progress", "--set", "mask_ratio=0.5",
                     "--export", "w.safetensors"]) == 0
    assert (out / "model" / "vitkit.json").is_file() and (out / "w.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["pretrain", "vitkit/vit-tiny-cifar", "--data", "digits", "--out", str(out),
                     "--set", "mask_ratio=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mask_ratio" in err and "Traceback" not in err
