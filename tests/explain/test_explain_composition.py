"""Explanations compose with adapters that insert prompts (VPT) and with token reduction (ToMe, EViT, ATS, GTP):
captured attention still equals the eager softmax, and every map comes back on the patch grid."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from vitkit.explain.attention import fused_flags

from conftest import make_variant

TOKEN_METHODS = {"tome": dict(r=4), "evit": {}, "ats": {}, "gtp": {}}


def registered(name: str) -> bool:
    return name in {m.name for m in vk.methods()}


def eager_attention(model, x):
    ref, out = copy.deepcopy(model), {}
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, a[0].detach()))
    with torch.no_grad():
        ref(x)
    return out


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts(deep, images):
    if not registered("vpt"):
        pytest.skip("vpt not registered")
    model = make_variant("registers")
    vk.adapt(model, "vpt", num_prompts=3, deep=deep)
    with torch.no_grad():
        plain = model(images)
    maps = vk.attention(model, images)
    ref = eager_attention(model, images)
    for i, la in maps.items():
        assert la.num_prompts == 3 and la.attn.shape[-1] == 5 + 3 + 64
        assert (la.attn - ref[i]).abs().max() <= 1e-5
    assert torch.equal(maps.output, plain)
    for method in ("attention", "rollout", "grad_rollout", "gradcam"):
        e = vk.explain(model, images, method=method)
        assert e.patch_map.shape == (2, 8, 8), method
    assert vk.segment(model, images[:1], point=(3, 3)).patch_similarity.shape == (8, 8)
    assert all(fused_flags(model))


@pytest.mark.parametrize("name", list(TOKEN_METHODS))
def test_token_reduction(name, images):
    if not registered(name):
        pytest.skip(f"{name} not registered")
    model = make_variant("registers")
    vk.accelerate(model, name, **TOKEN_METHODS[name])
    flags = fused_flags(model)  # a method may choose eager attention itself; explaining must not change it
    maps = vk.attention(model, images)
    ref = eager_attention(model, images)
    for i, la in maps.items():
        assert (la.attn - ref[i]).abs().max() <= 1e-5, f"{name} block {i}"
    assert maps[len(model.blocks) - 1].attn.shape[-1] < 5 + 64, f"{name} reduced no token"
    for method in ("attention", "rollout", "grad_rollout", "gradcam"):
        e = vk.explain(model, images, method=method)
        assert e.patch_map.shape == (2, 8, 8) and torch.isfinite(e.heatmap).all(), f"{name} {method}"
    if name != "gtp":  # GTP propagates dropped tokens into kept ones: sizes exceed the patches mapped to them
        from vitkit.explain.maps import _expand
        from vitkit.explain.rollout_algo import fuse_heads

        for la in maps.values():
            full = _expand(la, fuse_heads(la.attn))
            assert full.shape[-1] == 5 + 64 and (full.sum(-1) - 1).abs().max() <= 1e-5, "unmerged rows sum to 1"
    rows = vk.explain(model, images, method="rollout")
    assert rows.patch_map.max() == pytest.approx(1.0)
    assert fused_flags(model) == flags
