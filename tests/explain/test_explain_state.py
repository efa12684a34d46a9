"""Explaining leaves the caller's state alone and says what it does (issue 12 item 7), and token reduction that
kept no source map is refused with the real reason (issue 11 item 12)."""
from __future__ import annotations

import logging

import pytest
import torch

import vitkit as vk

from conftest import make_variant


def test_gradcam_keeps_accumulated_gradients(images):
    model = make_variant("plain").train()
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(-1).sum().backward()  # a user's accumulated gradients, mid-step
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    tensors = {n: p.grad for n, p in model.named_parameters()}
    e = vk.explain(model, images, method="gradcam", target=3)
    assert e.target == [3, 3] and e.patch_map.sum() > 0
    for n, p in model.named_parameters():
        assert p.grad is tensors[n] and torch.equal(p.grad, before[n]), f"{n}: gradient changed by gradcam"
    assert model.training, "train mode restored"
    assert not images.requires_grad and images.grad is None, "the caller's input is left alone"


def test_gradcam_leaves_no_gradients_when_there_were_none(images):
    model = make_variant("plain")
    vk.explain(model, images, method="gradcam")
    assert all(p.grad is None for p in model.parameters())


def test_grad_rollout_uses_target_and_does_not_say_it_is_ignored(images, caplog):
    model = make_variant("plain")
    with caplog.at_level(logging.INFO, logger="vitkit"):
        a = vk.explain(model, images[:1], method="grad_rollout", target=1)
        b = vk.explain(model, images[:1], method="grad_rollout", target=7)
    assert "ignored" not in caplog.text
    assert a.target == [1] and b.target == [7]
    assert not torch.allclose(a.patch_map, b.patch_map), "the target changes the gradient-weighted map"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkit"):
        vk.explain(model, images[:1], method="rollout", target=1)
    assert "ignored" in caplog.text, "rollout is class-agnostic: it says so"


@pytest.mark.parametrize("method", ["rollout", "grad_rollout", "attention", "gradcam"])
def test_tome_without_unmerge_names_the_reason(method, images):
    model = make_variant("plain")
    vk.accelerate(model, "tome", r=4, unmerge=False)
    with pytest.raises((NotImplementedError, ValueError), match="unmerge=True") as err:
        vk.explain(model, images, method=method)
    assert "prompt" not in str(err.value), "merged tokens, not prompts, are the reason"
    kept = make_variant("plain")
    vk.accelerate(kept, "tome", r=4)  # unmerge=True: the source map maps merged tokens back to patches
    e = vk.explain(kept, images, method=method)
    assert e.patch_map.shape == (2, 8, 8) and torch.isfinite(e.patch_map).all()
