"""New adapter modules follow the model they extend: its dtype (bf16 / fp16 models, issue 11.9) and its current
train/eval mode (a module starts in train mode; an adapter added to a model in eval must not run its dropout)."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import make_variant
from vitkit.adapt import lora, ssf

ADAPTERS = [
    pytest.param("lora", {}, id="lora-qv"),
    pytest.param("lora", dict(targets=("qkv", "mlp")), id="lora-peft"),
    pytest.param("adaptformer", dict(bottleneck=8), id="adaptformer"),
    pytest.param("vpt", {}, id="vpt-shallow"),
    pytest.param("vpt", dict(deep=True), id="vpt-deep"),
    pytest.param("ssf", {}, id="ssf"),
    pytest.param("bitfit", {}, id="bitfit"),
]


def perturb(model, seed: int = 0) -> None:
    """Move every trainable tensor, so that each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", ADAPTERS)
def test_adapter_takes_the_models_dtype(name, kwargs, dtype, images):
    model = make_variant("plain").to(dtype)
    vk.adapt(model, name, **kwargs)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != dtype}
    assert not wrong, f"{name}: parameters not in {dtype}: {sorted(wrong.items())[:4]}"
    perturb(model)
    reference = copy.deepcopy(model).float()
    with torch.no_grad():
        out = model(images.to(dtype))
        expected = reference(images)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)  # the same function, in half precision


@pytest.mark.parametrize("name,kwargs", ADAPTERS)
def test_bf16_training_step_reaches_only_trainable_tensors(name, kwargs, images):
    model = vk.adapt(make_variant("plain").to(torch.bfloat16).train(), name, **kwargs)
    model(images.to(torch.bfloat16)).float().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("merge,kwargs", [(lora.merge, dict(targets=("q", "v", "mlp"))), (ssf.merge, {})],
                         ids=["lora", "ssf"])
def test_merge_keeps_bf16(merge, kwargs, images):
    model = make_variant("plain").to(torch.bfloat16)
    vk.adapt(model, "lora" if merge is lora.merge else "ssf", **kwargs)
    perturb(model)
    with torch.no_grad():
        out = model(images.bfloat16()).float()
        merged = merge(model)
        torch.testing.assert_close(merged(images.bfloat16()).float(), out, atol=5e-2, rtol=5e-2)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,kwargs", ADAPTERS + [pytest.param("lora", dict(tuner="loha", targets=("qkv",)),
                                                                  id="loha")])
def test_new_modules_follow_the_models_mode(name, kwargs, training, images):
    model = make_variant("plain").train(training)
    vk.adapt(model, name, **kwargs)
    wrong = [n for n, m in model.named_modules() if m.training != training]
    assert not wrong, f"{name}: modules not in {'train' if training else 'eval'} mode: {wrong[:4]}"


def test_adapter_in_eval_model_runs_no_dropout(images):
    """The use that breaks otherwise: adapters with dropout added to an evaluating model give repeatable outputs."""
    model = make_variant("plain").eval()
    vk.adapt(model, "adaptformer", dropout=0.5)
    vk.adapt(model, "lora", dropout=0.5, targets=("q", "v", "proj"))
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), atol=0, rtol=0)
