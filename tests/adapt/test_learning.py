"""Learning on real data: vitkit's embedded pretrained ViT (`vitkit/vit-tiny-cifar`, CIFAR-10) adapted to sklearn
digits, the downstream task of `vitkit demo`, with `vk.fit` at **each method's own defaults** (the `lr` and
`weight_decay` of its Config, from its paper or the PETL benchmarks; `vitkit.train.default_hparams`).

Task (tests/adapt/digits_task.py): 800 training / 400 held-out digits, 32x32, 3 channels, mean = std = 0.5; a
fresh seeded 10-class head; AdamW, batch 50, cosine without warmup, 3 epochs (48 steps), one torch thread
(deterministic). The spec's margins (shared/methods/adapt.md): LoRA >= linear + 0.10, VPT-deep >= linear + 0.05,
BitFit and SSF >= linear.

Measured (timm 1.0.31, torch 2.14.1 CPU, one thread; initial held-out accuracy 0.10-0.12 for every method):

| method | its lr (wd) | held-out acc, 3 epochs | margin over linear | spec |
|---|---|---|---|---|
| linear probe | 1e-3 (1e-4) | 0.320 | | |
| lora q,v r=8 | 1e-3 (1e-4) | 0.543 | +0.223 | +0.10 |
| vpt-deep n=10 | 1e-3 (1e-4) | 0.375 | +0.055 | +0.05 |
| bitfit | 1e-3 (1e-4) | 0.410 | +0.090 | >= 0 |
| ssf | 1e-2 (5e-5) | 0.808 | +0.488 | >= 0 |
| adaptformer d=64 | 1e-3 (1e-4) | 0.420 | +0.100 | >= 0 |
| vpt n=4 (shallow) | 1e-3 (1e-4) | 0.360 | +0.040 | >= 0 |

Every spec margin is reached; VPT-deep's by 0.005 (2 of 400 images): the runs are seeded and single-threaded, so
deterministic on one platform, but that margin is the first to move with another torch build. The accuracies
are far below the papers' because the recipes' lr 1e-3 is meant for ~1,600 steps (100 epochs) and gets 48 here:
zero-initialised adapters barely leave the identity (at a tuned lr 1e-2, LoRA reached 0.897 on this task),
and SSF, whose recipe uses 1e-2, learns fastest. Each method must also gain 0.15 over its initial accuracy.
"""
from __future__ import annotations

import pytest
import torch

import vitkit as vk
from digits_task import accuracy, digits_split, pretrained, train

pytestmark = pytest.mark.slow
EPOCHS = 3

# (method, config, the spec's margin over the linear probe)
CASES = [
    pytest.param("lora", {}, 0.10, id="lora"),
    pytest.param("vpt", {"deep": True, "num_prompts": 10}, 0.05, id="vpt-deep"),
    pytest.param("bitfit", {}, 0.0, id="bitfit"),
    pytest.param("ssf", {}, 0.0, id="ssf"),
    pytest.param("adaptformer", {}, 0.0, id="adaptformer"),
    pytest.param("vpt", {"num_prompts": 4}, 0.0, id="vpt-shallow"),
]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(one_thread):
    return digits_split(800, 400)


@pytest.fixture(scope="module")
def linear_probe(task, tmp_path_factory) -> float:
    """The linear probe at its own defaults."""
    model = vk.adapt(pretrained(), "linear")
    return train(model, *task, epochs=EPOCHS, out_dir=tmp_path_factory.mktemp("linear"))


def test_linear_probe_learns(linear_probe):
    print(f"MEASURED linear: {linear_probe:.3f}")
    assert linear_probe >= 0.25, f"linear probe {linear_probe:.3f}"


@pytest.mark.parametrize("name,cfg,margin", CASES)
def test_method_beats_the_linear_probe_by_the_spec_margin(name, cfg, margin, task, linear_probe, tmp_path):
    model = vk.adapt(pretrained(), name, **cfg)
    lr = vk.applied(model)[-1].config.lr
    initial = accuracy(model, task[1])
    final = train(model, *task, epochs=EPOCHS, out_dir=tmp_path)
    print(f"MEASURED {name} {cfg} lr={lr:g}: {initial:.3f} -> {final:.3f} (linear {linear_probe:.3f}, "
          f"margin {final - linear_probe:+.3f}, spec {margin:+.2f})")
    assert final >= initial + 0.15, f"{name} {cfg}: {initial:.3f} -> {final:.3f}"
    assert final >= linear_probe + margin, (f"{name} {cfg}: {final:.3f} < linear probe {linear_probe:.3f} + "
                                            f"{margin}")
