"""Learning on real data: vitkit's embedded pretrained ViT (`vitkit/vit-tiny-cifar`, CIFAR-10) adapted to sklearn
digits, the downstream task of `vitkit demo`, with `vk.fit`.

Task (tests/adapt/digits_task.py): 800 training / 400 held-out digits, 32x32, 3 channels, mean = std = 0.5; a
fresh seeded 10-class head; AdamW, batch 50, cosine without warmup, no weight decay, 3 epochs (48 steps), one
torch thread (deterministic, and far faster than two threads on a loaded 2-core machine). ~15 s per method.

Measured (timm 1.0.31, torch 2.14.1 CPU; initial held-out accuracy 0.10-0.12 for every method):

| method | lr | held-out acc, 3 epochs |
|---|---|---|
| linear probe | 1e-1 | 0.738 |
| lora q,v r=8 | 1e-2 | 0.897 |
| adaptformer d=64 | 3e-2 | 0.865 |
| vpt-deep n=10 | 2e-2 | 0.760 |
| vpt n=4 (shallow) | 3e-2 | 0.752 |
| bitfit | 1e-2 | 0.755 |
| ssf | 3e-2 | 0.668 |

Each method must improve on its initial accuracy by at least 0.3 (measured gains 0.55-0.80); LoRA, AdaptFormer
and VPT-deep must reach the linear probe's accuracy at the same epoch budget (measured margins +0.159, +0.127,
+0.022: the VPT-deep margin is 9 of 400 images; the runs are seeded and single-threaded, so deterministic).
(The same tests on the third-party shamail checkpoint measured linear 0.860, LoRA 0.942, AdaptFormer 0.942,
VPT-deep 0.885.)
"""
from __future__ import annotations

import pytest
import torch

import vitkit as vk
from digits_task import accuracy, digits_split, pretrained, train

pytestmark = pytest.mark.slow
EPOCHS = 3

# (method, config, lr, must reach the linear probe)
CASES = [
    pytest.param("lora", {}, 1e-2, True, id="lora"),
    pytest.param("adaptformer", {}, 3e-2, True, id="adaptformer"),
    pytest.param("vpt", {"deep": True, "num_prompts": 10}, 2e-2, True, id="vpt-deep"),
    pytest.param("vpt", {"num_prompts": 4}, 3e-2, False, id="vpt-shallow"),
    pytest.param("bitfit", {}, 1e-2, False, id="bitfit"),
    pytest.param("ssf", {}, 3e-2, False, id="ssf"),
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
    """The linear probe at lr 1e-1 (the best of {1e-2, 3e-2, 1e-1} on the shamail checkpoint; measured 0.738)."""
    model = vk.adapt(pretrained(), "linear")
    return train(model, *task, lr=1e-1, epochs=EPOCHS, out_dir=tmp_path_factory.mktemp("linear"))


def test_linear_probe_learns(linear_probe):
    assert linear_probe >= 0.65, f"linear probe {linear_probe:.3f}, measured 0.738"


@pytest.mark.parametrize("name,cfg,lr,reach_linear", CASES)
def test_method_learns(name, cfg, lr, reach_linear, task, linear_probe, tmp_path):
    model = vk.adapt(pretrained(), name, **cfg)
    initial = accuracy(model, task[1])
    final = train(model, *task, lr=lr, epochs=EPOCHS, out_dir=tmp_path)
    print(f"MEASURED {name} {cfg} lr={lr}: {initial:.3f} -> {final:.3f} (linear {linear_probe:.3f})")
    assert final >= initial + 0.3, f"{name} {cfg}: {initial:.3f} -> {final:.3f}"
    if reach_linear:
        assert final >= linear_probe, f"{name} {cfg}: {final:.3f} < linear probe {linear_probe:.3f}"
