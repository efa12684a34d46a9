"""Gradient checkpointing (`model.set_grad_checkpointing(True)`) with every runner method: the recomputation in
the backward pass must see the token state the first pass saw, so loss and gradients equal plain training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant

METHODS = {
    "vpt_shallow": ("vpt", dict(num_prompts=3)),
    "vpt_deep": ("vpt", dict(num_prompts=3, deep=True, dropout=0.2)),  # dropout: the RNG is replayed too
    "tome": ("tome", dict(r=6)),
    "evit": ("evit", dict(keep_rate=0.5)),
    "ats": ("ats", dict(num_samples=40)),
    "gtp": ("gtp", dict(num_prop=6)),
    "lora": ("lora", dict(rank=2)),
    "adaptformer": ("adaptformer", {}),
    "vpt_deep+tome": None,  # composition: prompts protected by the merges, both recomputed
}


def _build(key: str, variant: str = "plain"):
    model = make_variant(variant)
    if key == "vpt_deep+tome":
        vk.adapt(model, "vpt", num_prompts=3, deep=True)
        vk.accelerate(model, "tome", r=6)
    else:
        name, config = METHODS[key]
        vk.apply(model, name, **config)
    torch.manual_seed(3)
    with torch.no_grad():  # make zero-initialised adapters matter
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or "up" in n.split(".")[-2:][0]):
                p.normal_(0, 0.2)
    return model


def _step(model, x, y):
    model.train()
    torch.manual_seed(11)  # same dropout draws in both runs
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("key", list(METHODS))
def test_checkpointed_training_equals_plain_training(key):
    plain = _build(key)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    loss, grads = _step(plain, x, y)
    loss_c, grads_c = _step(ckpt, x, y)
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=0)
    assert grads and grads.keys() == grads_c.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("key", ["tome", "ats", "gtp", "evit"])
def test_checkpointed_forward_intermediates_backward(key):
    plain = _build(key)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (plain, ckpt):
        model.train()
        final, inter = model.forward_intermediates(x, indices=[1, 4])
        (final.square().mean() + sum(t.square().mean() for t in inter)).backward()
        outs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in outs[0]:
        torch.testing.assert_close(outs[1][n], outs[0][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", ["plain", "tome", "vpt_deep"])
def test_grad_rollout_on_a_checkpointed_model(key):
    """The explainer takes gradients w.r.t. attention outputs inside the checkpointed blocks."""
    plain = make_variant("plain") if key == "plain" else _build(key)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    image = torch.randn(1, 3, 32, 32)
    ours = vk.explain(ckpt, image, method="grad_rollout")
    reference = vk.explain(plain, image, method="grad_rollout")
    torch.testing.assert_close(ours.patch_map, reference.patch_map, atol=1e-5, rtol=1e-4)
