"""Registry-wide conformance: every registered method on every variant (DESIGN §5).

A new method gets these tests by registering. A method that cannot handle a variant must refuse it with a
`NotImplementedError` naming itself; list the refusal in REFUSED so the suite checks it.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import VARIANTS, make_variant

# (method, variant) -> regex the refusal message must match
REFUSED: dict[tuple[str, str], str] = {
    ("evit", "no_cls_avg"): "evit: needs a class token",
    ("evit", "reg_no_cls"): "evit: needs a class token",
    ("ats", "no_cls_avg"): "ats: needs a class token",
    ("ats", "reg_no_cls"): "ats: needs a class token",
    **{("int4", v): "int4: torchao has int4 weight-only kernels for CUDA GPUs only" for v in VARIANTS},  # CPU models
    ("transmix", "no_cls_avg"): "transmix: needs a class token",
    ("transmix", "reg_no_cls"): "transmix: needs a class token",
}

# Input adapters take other inputs than RGB images: method -> (images, model) -> the adapted model's input, built
# so that it carries the images (extra channels / second image / frames of a static clip), see docs/applications.md.
INPUTS = {
    "channels": lambda x, m: torch.cat([x[:, [2, 1, 0]], torch.randn(x.shape[0], m.patch_embed.proj.in_channels - 3,
                                                                      *x.shape[2:])], 1),
    "spectrogram": lambda x, m: x.mean(1, keepdim=True),
    "paired": lambda x, m: torch.cat([x, torch.zeros_like(x)], 1),
    "video": lambda x, m: x.unsqueeze(2).expand(-1, -1, m.patch_embed.num_frames, -1, -1),
    "points": lambda x, m: x.flatten(1)[:, :3 * 256].reshape(x.shape[0], 256, 3),
}


# Methods whose model predicts something else than (B, num_classes): method -> the output shape on `images`.
OUTPUT_SHAPES = {"dense": (2, 10, 8, 8)}  # per-patch maps, one per class, on the 8x8 grid of 32px / 4px patches


def _input(name, images, model):
    return INPUTS[name](images, model) if name in INPUTS else images


METHODS = [m.name for m in vk.methods()]
CASES = [pytest.param(m, v, id=f"{m}-{v}") for m in METHODS for v in VARIANTS if (m, v) not in REFUSED]
REFUSED_CASES = [pytest.param(m, v, match, id=f"{m}-{v}") for (m, v), match in REFUSED.items()]


def test_every_field_documented():
    for method in vk.methods():
        assert method.doc, f"{method.name}: module docstring missing"
        for name, _, _, help_text in method.fields():
            assert help_text, f"{method.name}.{name} has no help"


@pytest.mark.parametrize("name,variant_name", CASES)
def test_identity_at_documented_setting(name, variant_name, images):
    method = vk.registry.get(name)
    if method.identity is None:
        pytest.skip(f"{name} declares no identity setting")
    model = make_variant(variant_name)
    reference = copy.deepcopy(model)
    out = vk.apply(model, name, **method.identity)
    assert out is model
    with torch.no_grad():
        torch.testing.assert_close(model(_input(name, images, model)), reference(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,variant_name", CASES)
def test_default_shapes_and_record(name, variant_name, images):
    model = make_variant(variant_name)
    vk.apply(model, name)
    assert [a.name for a in vk.applied(model)] == [name]
    images = _input(name, images, model)
    with torch.no_grad():
        assert model(images).shape == OUTPUT_SHAPES.get(name, (2, 10))
        assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name,variant_name", CASES)
def test_save_load_round_trip(name, variant_name, images, tmp_path):
    model = make_variant(variant_name)
    vk.apply(model, name)
    with torch.no_grad():  # move every trainable tensor so the round trip has something to carry
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved").eval()
    images = _input(name, images, model)
    assert [a.name for a in vk.applied(loaded)] == [name]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,variant_name,match", REFUSED_CASES)
def test_refuses_clearly(name, variant_name, match):
    with pytest.raises(NotImplementedError, match=match):
        vk.apply(make_variant(variant_name), name)
