"""BitFit: applying it changes nothing; exactly the biases (+ head) train; counts; training moves only those."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vit_oracle import base_tensors, vit_forward

D, L, H = TINY["embed_dim"], TINY["depth"], 4 * TINY["embed_dim"]


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.adapt(model, "bitfit")
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=0, rtol=0)


@pytest.mark.parametrize("norm_bias", [True, False])
def test_trainable_set_is_exactly_biases_and_head(norm_bias):
    model = vk.adapt(make_variant("plain"), "bitfit", norm_bias=norm_bias)
    block = ["attn.qkv.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias"]
    block += ["norm1.bias", "norm2.bias"] if norm_bias else []
    expected = {f"blocks.{i}.{n}" for i in range(L) for n in block} | {"patch_embed.proj.bias", "head.weight",
                                                                        "head.bias"}
    expected |= {"norm.bias"} if norm_bias else set()
    assert trainable_names(model) == expected
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_block = 3 * D + D + H + D + (2 * D if norm_bias else 0)
    assert count == L * per_block + D + (D if norm_bias else 0) + D * 10 + 10


def test_no_qkv_bias_model_has_fewer():
    model = vk.adapt(make_variant("plain", qkv_bias=False), "bitfit")
    assert not any("qkv" in n for n in trainable_names(model))


@pytest.mark.parametrize("norm_bias,count", [(True, 102_912), (False, 83_712)])
def test_vit_base_counts(norm_bias, count):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vk.adapt(model, "bitfit", norm_bias=norm_bias)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_training_changes_only_biases_and_head(images):
    model = vk.adapt(make_variant("registers"), "bitfit")
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 2])).backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable_names(model), sorted(changed - trainable_names(model))[:5]


def test_trained_biases_match_plain_torch_oracle(images):
    """After moving exactly the biases the spec names (and the head), a hand-written forward with the model's
    tensors gives the model's logits: the moved biases are the ones used, where timm uses them."""
    model = vk.adapt(make_variant("plain"), "bitfit")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
        out = model(images)
    expected = vit_forward(base_tensors(model), images, heads=4)
    assert (expected - make_variant("plain")(images)).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
