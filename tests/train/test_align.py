"""vk.align: InfoNCE against a plain-torch oracle, minimal for aligned pairs; recall@k by hand; training aligns a
new encoder to a frozen ViT (and leaves the ViT unchanged)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn

import vitkit as vk
from vitkit.train.align import Aligner, embed_sensors, info_nce, prototype_accuracy, recall_at_k


def _oracle(q, k, t):
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    s = (q @ k.T / t).tolist()
    n = len(s)
    row = sum(math.log(sum(math.exp(v) for v in s[i])) - s[i][i] for i in range(n)) / n
    col = sum(math.log(sum(math.exp(s[j][i]) for j in range(n))) - s[i][i] for i in range(n)) / n
    return row, (row + col) / 2


def test_info_nce_equals_the_formula_and_is_minimal_for_aligned_pairs():
    torch.manual_seed(0)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    row, both = _oracle(q, k, 0.1)
    assert info_nce(q, k, 0.1, symmetric=False).item() == pytest.approx(row, rel=1e-5)
    assert info_nce(q, k, 0.1).item() == pytest.approx(both, rel=1e-5)
    keys = torch.randn(4, 8)
    aligned = info_nce(keys * 3.0, keys, 0.1).item()  # same directions: the scale is normalised away
    for perm in itertools.permutations(range(4)):
        if list(perm) != list(range(4)):
            assert info_nce(keys[list(perm)], keys, 0.1).item() > aligned


def test_recall_and_prototype_accuracy_on_a_hand_computed_example():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 0.1], [1.0, 0.2], [-1.0, -0.5]])  # 0: own key first; 1: own key second; 2: first
    assert recall_at_k(query, keys, ks=(1, 2)) == {"recall@1": pytest.approx(2 / 3), "recall@2": 1.0}
    labels = torch.tensor([0, 1, 0])
    key_labels = torch.tensor([0, 1, 1])  # prototypes: class 0 -> (1, 0); class 1 -> mean of (0,1), (-1,0)
    assert prototype_accuracy(query, labels, keys, key_labels) == pytest.approx(1 / 3)


def test_align_trains_a_new_encoder_onto_a_frozen_vit(tmp_path):
    torch.manual_seed(0)
    vit = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2,
                  num_heads=2, num_classes=4)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    z = torch.randn(128, 4)  # the content both modalities see: images and sensor readings are two views of z
    images = (z @ torch.randn(4, 3 * 16 * 16)).view(-1, 3, 16, 16)
    sensors = (z @ torch.randn(4, 64)).view(-1, 1, 8, 8) + 0.1 * torch.randn(128, 1, 8, 8)
    pairs = [(s, im, int(c > 0)) for s, im, c in zip(sensors, images, z[:, 0])]
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 24))
    untrained = vk.align(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 24)), vit,
                         pairs[:96], val=pairs[96:], epochs=0, out_dir=tmp_path / "r0", progress=False)
    result = vk.align(encoder, vit, pairs[:96], val=pairs[96:], epochs=15, lr=3e-3, batch_size=32,
                      out_dir=tmp_path / "r", progress=False)
    assert result.fit.history[-1]["train_loss"] < result.fit.history[0]["train_loss"]
    assert result.metrics["recall@1"] > untrained.metrics["recall@1"]
    assert set(result.metrics) == {"recall@1", "recall@5", "prototype_top1"}
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    assert result.aligner.embed(sensors[:3]).shape == (3, 32)


def test_bad_input_is_refused():
    vit = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=1,
                  num_heads=2, num_classes=4)
    enc = nn.Flatten()
    with pytest.raises(ValueError, match="temperature"):
        vk.align(enc, vit, [(torch.zeros(4), torch.zeros(3, 16, 16))], temperature=0)
    with pytest.raises(ValueError, match="yield"):
        vk.align(enc, vit, [torch.zeros(3, 16, 16)])
    with pytest.raises(ValueError, match="empty"):
        vk.align(enc, vit, [])
    with pytest.raises(TypeError, match="timm-style"):
        vk.align(enc, nn.Linear(2, 2), [(torch.zeros(4), torch.zeros(3, 16, 16))])


def test_validation_sensors_go_to_the_aligners_device():
    """After vk.fit the aligner sits on the accelerator; the validation sensors (CPU tensors) used to be embedded
    as they were: a device mismatch on a GPU. A `meta` aligner stands for another device here."""
    torch.manual_seed(0)
    aligner = Aligner(nn.Linear(6, 4), 4, 4, 0.07, True)
    sensors = list(torch.randn(5, 6))
    torch.testing.assert_close(embed_sensors(aligner, sensors, batch_size=2), aligner.embed(torch.stack(sensors)))
    aligner.to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):  # the old path: CPU inputs to a model elsewhere
        aligner.embed(torch.stack(sensors))
    q = embed_sensors(aligner, sensors, batch_size=2)
    assert (q.device.type, tuple(q.shape)) == ("meta", (5, 4))
