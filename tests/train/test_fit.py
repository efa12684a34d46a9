"""vk.fit: schedule, exact resume, NaN stop with an intact checkpoint, only trainable tensors move, metrics files."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

import vitkit as vk
from tests.conftest import make_variant
from vitkit.train.fit import NonFiniteLossError, ResumeMismatchError, epoch_order, lr_at


def digits_parts(model, n_train=5, n_val=3, train_aug=True):
    parts = vk.data.split(vk.data.digits(), seed=0, train=n_train, val=n_val)
    return (parts["train"].with_transform(vk.data.transform(model, train=train_aug, scale=(0.6, 1.0))),
            parts["val"].with_transform(vk.data.transform(model)))


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup=4, total=14, min_lr=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(99, **kw) == pytest.approx(0.1)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    shards = [epoch_order(11, 0, 0, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6 and set(shards[0]) | set(shards[1]) == set(range(11))


def _run(tmp, interrupt_after=None, resume=False):
    # dropout + random augmentation + accumulation: resume must restore RNG, optimizer and schedule to be exact
    model = make_variant("plain", seed=5, drop_rate=0.1, proj_drop_rate=0.1)
    vk.adapt(model, "full")
    train, val = digits_parts(model)

    def stop(metrics):
        if interrupt_after is not None and metrics["epoch"] == interrupt_after:
            raise KeyboardInterrupt

    vk.fit(model, train, val, epochs=3, lr=3e-3, batch_size=16, grad_accum=2, warmup_epochs=1, out_dir=tmp,
           resume=resume, progress=False, on_epoch_end=stop, seed=7)
    return model


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", interrupt_after=1)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = _run(tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 4


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = make_variant("plain")
    vk.adapt(model, "full")
    train, val = digits_parts(model, train_aug=False)

    def poison(metrics):  # after epoch 1 is checkpointed, make the weights produce NaN
        with torch.no_grad():
            model.patch_embed.proj.weight.fill_(float("nan"))

    first_of_epoch2 = math.ceil(len(train) / 16) + 1
    with pytest.raises(NonFiniteLossError, match=rf"at step {first_of_epoch2} \(epoch 2, batch 1\).*last.pt"):
        vk.fit(model, train, val, epochs=3, batch_size=16, out_dir=tmp_path, progress=False, on_epoch_end=poison)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_only_trainable_tensors_move_and_the_adapter_is_saved(tmp_path):
    model = make_variant("plain")
    vk.adapt(model, "linear")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = digits_parts(model, train_aug=False)
    result = vk.fit(model, train, val, epochs=1, batch_size=16, out_dir=tmp_path, progress=False)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"head.weight", "head.bias"}, moved
    assert set(torch.load(tmp_path / "last.pt", weights_only=True)["model"]) == {"head.weight", "head.bias"}
    assert result.history[0]["epoch"] == 1 and 0 <= result.history[0]["val_acc"] <= 1
    assert (tmp_path / "model" / "vitkit.json").is_file()


def test_nothing_trainable_is_a_clear_error(tmp_path):
    model = make_variant("plain").requires_grad_(False)
    train, _ = digits_parts(model)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        vk.fit(model, train, epochs=1, out_dir=tmp_path, progress=False)


def _budget_run(tmp, epochs, resume=False, **kw):
    model = make_variant("plain", seed=5)
    vk.adapt(model, kw.pop("method", "linear"))
    train, _ = digits_parts(model, train_aug=False)
    args = dict(epochs=epochs, lr=1e-2, batch_size=16, warmup_epochs=0, out_dir=tmp, resume=resume, progress=False,
                save_model=False, seed=3)
    vk.fit(model, train, **{**args, **kw})
    return model


def test_resume_false_starts_clean_and_a_changed_budget_is_not_resumed_silently(tmp_path):
    # issue 12.2 / 12.3: a 2-epoch run re-run at 3 epochs must not silently continue the 2-epoch schedule
    genuine = _budget_run(tmp_path / "fresh", 3).state_dict()
    _budget_run(tmp_path / "run", 2)
    with pytest.raises(ResumeMismatchError, match=r"epochs 2 -> 3.*resume=False.*resume='force'"):
        _budget_run(tmp_path / "run", 3, resume=True)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2  # refused: nothing changed
    clean = _budget_run(tmp_path / "run", 3, resume=False).state_dict()
    assert all(torch.equal(clean[k], genuine[k]) for k in genuine), "resume=False is not the genuine 3-epoch run"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("change,expected", [
    ({"batch_size": 8}, "batch_size 16 -> 8"),
    ({"lr": 3e-2}, "lr 0.01 -> 0.03"),
    ({"method": "bitfit"}, "methods"),
    ({"seed": 4}, "seed 3 -> 4"),
])
def test_resume_with_changed_settings_is_refused_or_forced(change, expected, tmp_path):
    with pytest.raises(KeyboardInterrupt):  # interrupted after epoch 1 of 2
        _budget_run(tmp_path, 2, on_epoch_end=_stop_after_1)
    with pytest.raises(ResumeMismatchError, match=re.escape(expected)):
        _budget_run(tmp_path, 2, resume=True, **change)
    if "method" in change:  # other tensors: even forcing cannot load them
        return
    with pytest.warns(UserWarning, match=re.escape(expected)):
        _budget_run(tmp_path, 2, resume="force", **change)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def _stop_after_1(metrics):
    if metrics["epoch"] == 1:
        raise KeyboardInterrupt
