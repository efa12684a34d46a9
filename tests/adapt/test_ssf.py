"""SSF: identity init exact, default init statistics, counts, merged == unmerged and plain timm after merge."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vitkit.adapt import ssf

D, L, H = TINY["embed_dim"], TINY["depth"], 4 * TINY["embed_dim"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".ssf_scale", ".ssf_shift")):
                p.copy_((1.0 if name.endswith("scale") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity_init_is_exact(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.adapt(model, "ssf", init="identity")
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-6, rtol=1e-6)


def test_default_init_statistics():
    model = vk.adapt(make_variant("plain"), "ssf")
    scale = torch.cat([p.detach() for n, p in model.named_parameters() if n.endswith("ssf_scale")])
    shift = torch.cat([p.detach() for n, p in model.named_parameters() if n.endswith("ssf_shift")])
    assert abs(scale.mean() - 1) < 0.005 and abs(scale.std() - 0.02) < 0.003
    assert abs(shift.mean()) < 0.005 and abs(shift.std() - 0.02) < 0.003


@pytest.mark.parametrize("name,final", [("plain", "norm"), ("no_cls_avg", "fc_norm")])
def test_trainable_count_formula(name, final):
    model = vk.adapt(make_variant(name), "ssf")
    per_block = 2 * (D + 3 * D + D + D + H + D)  # norm1, qkv, proj, norm2, fc1, fc2
    assert trainable(model) == L * per_block + 2 * D + 2 * D + D * 10 + 10  # patch embed, final norm, head
    assert isinstance(getattr(model, final), ssf.SSF)


def test_vit_base_count():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vk.adapt(model, "ssf")
    assert trainable(model) == 205_824


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_equals_unmerged_and_is_plain_timm(name, images):
    model = make_variant(name)
    vk.adapt(model, "ssf")
    randomize(model)
    with torch.no_grad():
        unmerged = model(images)
        merged_model = ssf.merge(model)
        merged = merged_model(images)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert type(merged_model) is VisionTransformer
    assert not any(isinstance(m, ssf.SSF) for m in merged_model.modules())
    assert "ssf" not in [a.name for a in vk.applied(merged_model)]
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **VARIANTS[name]}).eval()
    fresh.load_state_dict(merged_model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_into_bias_free_linear(images):
    model = vk.adapt(make_variant("plain", qkv_bias=False), "ssf")
    randomize(model)
    with torch.no_grad():
        unmerged = model(images)
        torch.testing.assert_close(ssf.merge(model)(images), unmerged, atol=1e-5, rtol=1e-5)


def test_only_scales_shifts_and_head_train():
    model = vk.adapt(make_variant("registers"), "ssf")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("ssf_scale", "ssf_shift")) or n.startswith("head.") for n in names)
