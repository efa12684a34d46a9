"""Augmentations attached with vk.augment act through vk.fit's classification loss (`mix_batch`); distillation
(`computes_loss`) and self-supervised objectives compute their loss on the plain batch. Before the fix an attached
augmentation was silently ignored there (the trained weights were bit-identical with and without it); now each path
refuses it, naming the augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import vitkit as vk
from conftest import make_variant
from vitkit.augment import attach
from vitkit.train import fit


def _data(model, n=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    return vk.data.arrays(images, [i % 2 for i in range(n)]).with_transform(vk.data.transform(model))


def test_distill_refuses_a_student_with_an_augmentation(tmp_path):
    teacher, student = make_variant("plain"), vk.augment(make_variant("plain", seed=1), "transmix", prob=1.0)
    with pytest.raises(ValueError, match="distill: augmentation.s. transmix are attached.*`kd` loss.*ignored"):
        vk.distill(teacher, student, _data(student), "kd", epochs=1, out_dir=tmp_path, progress=False)


def test_pretrain_refuses_a_model_with_an_augmentation(tmp_path):
    model = vk.augment(make_variant("plain"), "transmix", prob=1.0)
    with pytest.raises(ValueError, match="pretrain: augmentation.s. transmix are attached.*`mae` objective"):
        vk.pretrain(model, _data(model), "mae", epochs=1, out_dir=tmp_path, progress=False)


class _SelfLoss(nn.Module):
    """A model that computes its own loss, as vk.distill's Distiller does."""

    computes_loss = True

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 2)

    def forward(self, images, targets=None):
        logits = self.fc(images.flatten(1))
        return logits if targets is None else (logits, nn.functional.cross_entropy(logits, targets), targets)


def test_fit_refuses_augmentations_on_a_model_that_computes_its_loss(tmp_path):
    model = _SelfLoss()
    attach(model, "flip", lambda m, mix, extras: mix)
    train = vk.data.arrays(np.zeros((4, 32, 32, 3), dtype=np.uint8), [0, 1, 0, 1])
    train = train.with_transform(lambda img: torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="fit: augmentation.s. flip are attached.*`computes_loss`"):
        fit(model, train, epochs=1, out_dir=tmp_path, progress=False)
