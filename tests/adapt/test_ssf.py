"""SSF: identity init exact, default init statistics, counts, merged == unmerged and plain timm after merge."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitkit as vk
from conftest import TINY, VARIANTS, make_variant
from vit_oracle import base_tensors, vit_forward
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


def fresh_timm(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs}).eval()


@pytest.mark.parametrize("kwargs", [dict(pre_norm=True), dict(pre_norm=True, class_token=False, global_pool="avg"),
                                    dict(pre_norm=True, reg_tokens=4, no_embed_class=True)],
                         ids=["pre_norm", "pre_norm_no_cls", "pre_norm_no_embed_class"])
def test_merge_with_bias_free_patch_conv_loads_into_the_same_timm_architecture(kwargs, images):
    """CLIP-style pre_norm ViTs have no patch-conv bias: the conv's shift moves into pos_embed (issue 11.7)."""
    model = vk.adapt(make_variant("plain", **kwargs), "ssf")
    assert model.patch_embed.proj.base_layer.bias is None
    randomize(model)
    with torch.no_grad():
        unmerged = model(images)
        merged = ssf.merge(model)
        torch.testing.assert_close(merged(images), unmerged, atol=1e-5, rtol=1e-5)
    fresh = fresh_timm(**kwargs)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_with_bias_free_patch_conv_at_another_size():
    """The shift in pos_embed survives pos-embed resampling (a constant stays constant): 48 px on a 32 px model."""
    model = vk.adapt(make_variant("plain", pre_norm=True, dynamic_img_size=True), "ssf")
    randomize(model)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        unmerged = model(x)
        torch.testing.assert_close(ssf.merge(model)(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_into_bias_free_linear_is_refused_unless_a_bias_may_be_added(images):
    """qkv_bias=False: the qkv shift needs a `qkv.bias` the architecture lacks; refused, model untouched;
    add_bias=True merges, and the result loads into the qkv_bias=True architecture."""
    model = vk.adapt(make_variant("plain", qkv_bias=False), "ssf")
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(images)
    with pytest.raises(NotImplementedError, match=r"ssf: cannot merge the shift after blocks\.0\.attn\.qkv, a "
                                                  r"Linear without bias.*add_bias=True"):
        ssf.merge(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    merged = ssf.merge(model, add_bias=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), unmerged, atol=1e-5, rtol=1e-5)
    fresh_timm(qkv_bias=True).load_state_dict(merged.state_dict(), strict=True)


def test_failed_merge_changes_nothing(images):
    """A site that cannot merge (a late LayerNorm without affine) is found before any layer changes."""
    model = make_variant("plain")
    model.blocks[5].norm2 = torch.nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
    vk.adapt(model, "ssf")
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(images)
    with pytest.raises(NotImplementedError, match=r"ssf: cannot merge into blocks\.5\.norm2, a LayerNorm without"):
        ssf.merge(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert sum(isinstance(m, ssf.SSF) for m in model.modules()) == len(ssf.sites(model))
    with torch.no_grad():
        torch.testing.assert_close(model(images), out, atol=0, rtol=0)


# ---------------------------------------------------------------- oracle: plain torch from the spec (P5)

def test_matches_plain_torch_oracle(images):
    """gamma * y + beta per channel after the patch conv, norm1, qkv, proj, norm2, fc1, fc2 and the final norm."""
    model = vk.adapt(make_variant("plain"), "ssf")
    randomize(model)
    sd = base_tensors(model)
    sites_ = ["patch_embed.proj", "norm"] + [f"blocks.{i}.{s}" for i in range(L) for s in ssf.BLOCK_SITES]

    def site(name, inp, out):
        if name not in sites_:
            return out
        shape = (-1, 1, 1) if name == "patch_embed.proj" else (-1,)  # conv output (B, C, H, W): channel dim 1
        return out * sd[f"{name}.ssf_scale"].view(shape) + sd[f"{name}.ssf_shift"].view(shape)

    expected = vit_forward(sd, images, heads=4, site=site)
    with torch.no_grad():
        out = model(images)
    assert (expected - make_variant("plain")(images)).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_only_scales_shifts_and_head_train():
    model = vk.adapt(make_variant("registers"), "ssf")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("ssf_scale", "ssf_shift")) or n.startswith("head.") for n in names)
