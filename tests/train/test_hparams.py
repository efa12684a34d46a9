"""Per-method training defaults: every adaptation method states its lr and weight decay, `vk.fit` uses them.

`vk.fit(lr=None, weight_decay=None)` takes them from the applied methods (`default_hparams`): the lowest lr of
the applied methods that state one, with that method's weight decay; token methods state none.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import vitkit as vk
from tests.conftest import make_variant
from vitkit.registry import get
from vitkit.train.fit import default_hparams
from vitkit.train.hparams import FALLBACK_LR, FALLBACK_WEIGHT_DECAY

ADAPT = [m.name for m in vk.methods("adapt")]


@pytest.mark.parametrize("name", ADAPT)
def test_every_adapt_method_states_its_lr_and_weight_decay_with_a_source(name):
    fields = {f.name: f for f in dataclasses.fields(get(name).config)}
    assert {"lr", "weight_decay"} <= set(fields), f"{name}: Config has no lr / weight_decay field"
    cfg = get(name).config()
    assert 0 < cfg.lr < 1 and 0 <= cfg.weight_decay < 1, (cfg.lr, cfg.weight_decay)
    for key in ("lr", "weight_decay"):
        assert "from" in fields[key].metadata["help"], f"{name}.{key}: the help must say where the value comes from"


def test_token_methods_state_no_lr():
    for method in vk.methods("accelerate"):
        assert "lr" not in {f.name for f in dataclasses.fields(method.config)}, method.name


def _tiny_train():
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, torch.arange(20) % 10)


@pytest.mark.parametrize("name", ["lora", "ssf", "linear"])
def test_fit_uses_the_method_lr_unless_given(name, tmp_path):
    model = vk.adapt(make_variant("plain"), name)
    cfg = vk.applied(model)[-1].config
    result = vk.fit(model, _tiny_train(), epochs=1, batch_size=20, warmup_epochs=0, out_dir=tmp_path / "a",
                    progress=False, save_model=False)
    assert (result.config["lr"], result.config["weight_decay"]) == (cfg.lr, cfg.weight_decay)
    assert name in result.config["lr_source"]
    given = vk.fit(vk.adapt(make_variant("plain"), name), _tiny_train(), epochs=1, batch_size=20, lr=0.123,
                   weight_decay=0.0, out_dir=tmp_path / "b", progress=False, save_model=False)
    assert (given.config["lr"], given.config["weight_decay"], given.config["lr_source"]) == (
        0.123, 0.0, "set by the caller")


def test_several_methods_lowest_lr_wins_and_token_methods_count_not():
    model = vk.adapt(make_variant("plain"), "lora")
    vk.adapt(model, "vpt", lr=0.5, weight_decay=0.25)
    lora = vk.applied(model)[0].config
    hp = default_hparams(model)
    assert (hp["lr"], hp["weight_decay"]) == (lora.lr, lora.weight_decay), hp
    assert hp["source"].startswith("lora") and "vpt 0.5" in hp["source"], hp["source"]
    vk.adapt(model, "full", lr=lora.lr / 10, weight_decay=0.125)  # full fine-tuning after an adapter
    vk.accelerate(model, "tome", r=1)
    assert default_hparams(model)["lr"] == lora.lr / 10 and default_hparams(model)["weight_decay"] == 0.125
    tie = vk.adapt(make_variant("plain"), "bitfit", lr=0.01, weight_decay=0.5)
    vk.adapt(tie, "lora", lr=0.01, weight_decay=0.0)
    assert default_hparams(tie)["weight_decay"] == 0.0  # tie: the method applied last


def test_no_method_falls_back_and_says_so():
    model = make_variant("plain")
    hp = default_hparams(model)
    assert (hp["lr"], hp["weight_decay"]) == (FALLBACK_LR, FALLBACK_WEIGHT_DECAY)
    assert "no applied method" in hp["source"]
