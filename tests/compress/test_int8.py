"""`int8` / `int4` (spec B4) against independent oracles: torch's own `quantize_dynamic` of the same model (the CPU
path), and a plain-torch int8 re-implementation of torchao's scheme (symmetric per-row weights, per-token
activations, scale = absmax / 127.5); identity with nothing quantised on every variant; targets quantised and the
rest float; FLOPs of the float graph; deepcopy, save/load at int8 size; compositions (ToMe -> int8, VPT -> int8,
prune -> int8) and refused orders; int4 refused on the CPU naming the device."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

import vitkit as vk
from conftest import VARIANTS, make_variant

TARGET = re.compile(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")


def torch_ao_oracle(model):
    """torch's own dynamic quantisation (per-channel int8 weights) of the spec's target Linears."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {n: per_channel_dynamic_qconfig for n, m in model.named_modules() if TARGET.fullmatch(n)}
    return quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


class FakeInt8Linear(nn.Module):
    """y = (round(x/sx) @ round(W/sw)^T)·sx·sw + b, symmetric, sx per token, sw per output row, s = absmax/127.5."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.w, self.b = linear.weight.detach(), linear.bias.detach()

    @staticmethod
    def quant(t, dim):
        s = t.abs().amax(dim, keepdim=True) / 127.5
        return (t * (1.0 / s)).round().clamp(-128, 127), s

    def forward(self, x):
        qw, sw = self.quant(self.w, 1)
        qx, sx = self.quant(x, -1)
        return (qx @ qw.T) * sx * sw.T + self.b


def torchao_oracle(model):
    other = copy.deepcopy(model)
    for name, m in list(other.named_modules()):
        if TARGET.fullmatch(name):
            parent, _, child = name.rpartition(".")
            setattr(other.get_submodule(parent), child, FakeInt8Linear(m))
    return other


@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_nothing_quantised_is_identity(variant_name, images):
    model = make_variant(variant_name)
    reference = copy.deepcopy(model)
    vk.compress(model, "int8", targets=())
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-6, rtol=0)


def test_cpu_default_is_torch_ao_and_equals_quantize_dynamic(images):
    model = make_variant("qk_norm")
    with torch.no_grad():  # logits with some spread, so that quantisation error is visible against them
        model.head.weight.mul_(20)
    reference = copy.deepcopy(model)
    oracle = torch_ao_oracle(model)
    vk.compress(model, "int8")
    assert vk.applied(model)[0].config.backend == "torch.ao"  # what ran is recorded
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        out, ref = model(x), reference(x)
        torch.testing.assert_close(out, oracle(x), atol=1e-6, rtol=0)
        assert (out - ref).abs().max() < 0.1 * ref.std(), ((out - ref).abs().max(), ref.std())
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
        assert (out - ref).abs().max() > 0  # it quantised something
    quantised = {n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    assert quantised == {n for n, _ in reference.named_modules() if TARGET.fullmatch(n)}
    assert type(model.head) is nn.Linear and model.head.weight.dtype == torch.float32
    assert vk.info(model).gmacs == pytest.approx(vk.info(reference).gmacs, rel=1e-9)  # float-graph FLOPs


def test_torchao_backend_matches_plain_torch_int8(images):
    model = make_variant("registers")
    oracle = torchao_oracle(model)
    reference = copy.deepcopy(model)
    vk.compress(model, "int8", backend="torchao")
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, oracle(images), atol=1e-5, rtol=1e-5)
        assert (out - reference(images)).abs().max() > 1e-4
    assert type(model.blocks[0].attn.qkv.weight).__name__ == "Int8Tensor" and model.head.weight.dtype == torch.float32
    assert vk.info(model).gmacs == pytest.approx(vk.info(reference).gmacs, rel=1e-9)


@pytest.mark.parametrize("backend", ["torch.ao", "torchao"])
def test_deepcopy_and_save_load_at_int8_size(backend, images, tmp_path):
    model = vk.load("vitkit/vit-tiny-cifar")
    vk.compress(model, "int8", backend=backend)
    copied = copy.deepcopy(model)
    saved = vk.save(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(saved / "weights.safetensors"), "pt") as f:
        ints = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith(("weight_int", "weight_qdata")))
        assert all(f.get_tensor(k).dtype == torch.int8 for k in f.keys() if k.endswith(("_int", "_qdata")))
        floats = sum(f.get_tensor(k).numel() for k in f.keys() if f.get_tensor(k).dtype.is_floating_point)
    weights = sum(m.weight.numel() for n, m in vk.load("vitkit/vit-tiny-cifar").named_modules() if TARGET.fullmatch(n))
    assert ints == weights and floats < weights / 20, (ints, floats, weights)  # integers, not float copies
    loaded = vk.load(saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
        torch.testing.assert_close(copied(images), model(images), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- composition
def test_tome_then_int8_equals_quantize_dynamic_of_the_tome_model():
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=4,
                    num_heads=4, num_classes=10).eval()
    vk.accelerate(model, "tome", r=8)
    oracle = torch_ao_oracle(model)  # the ToMe hooks deep-copy with the model
    vk.compress(model, "int8")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), atol=1e-6, rtol=0)
    assert vk.info(model).token_schedule["tokens"][-1] < 65  # ToMe still merges


def test_vpt_then_int8_keeps_prompts_float(images, tmp_path):
    model = make_variant("plain")
    vk.adapt(model, "vpt", num_prompts=3)
    with torch.no_grad():
        model.vpt.prompts.normal_()
    oracle = torch_ao_oracle(model)
    vk.compress(model, "int8")
    assert model.vpt.prompts.dtype == torch.float32 and isinstance(model.vpt.prompts, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(model(images), oracle(images), atol=1e-6, rtol=0)
        loaded = vk.load(vk.save(model, tmp_path / "v")).eval()
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)


def test_prune_then_int8_keeps_the_zeros(images, tmp_path):
    model = make_variant("plain")
    vk.compress(model, "prune", sparsity=0.5)
    vk.compress(model, "int8")
    w, _ = model.blocks[0].mlp.fc1._weight_bias()
    assert 0.4 < float((w.int_repr() == 0).float().mean()) < 0.9
    loaded = vk.load(vk.save(model, tmp_path / "pq")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)


@pytest.mark.parametrize("first,second,match", [
    (("int8", {}), ("int8", {}), "int8: blocks.0.attn.qkv is quantised already"),
    (("int8", {}), ("prune", {}), r"prune: blocks.0.attn.qkv is quantised already; prune the float model"),
    (("lora", {"targets": ["qkv"]}), ("int8", {}), r"int8: blocks.0.attn.qkv is a Linear.*lora.merge"),
])
def test_orders_that_cannot_work_are_refused(first, second, match):
    model = make_variant("plain")
    vk.apply(model, first[0], **first[1])
    with pytest.raises(ValueError, match=match):
        vk.apply(model, second[0], **second[1])


def test_int4_without_kernels_names_the_device():
    with pytest.raises(NotImplementedError, match="int4: .*CUDA GPUs only.*the model is on `cpu`"):
        vk.compress(make_variant("plain"), "int4")
    with pytest.raises(ValueError, match="int4: `group_size` must be 32, 64, 128 or 256, got 100"):
        vk.compress(make_variant("plain"), "int4", group_size=100)
