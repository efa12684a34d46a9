"""CvT (vitkit/models/cvt.py): a tiny random transformers `CvtForImageClassification`, saved with
`save_pretrained` and loaded with `vk.load`, gives transformers' own logits (transformers is the oracle: an
independent implementation); the timm-style surface (forward_features / forward_head / forward_intermediates,
gradient checkpointing, timm registry) and vk.save / vk.load."""
from __future__ import annotations

import pytest
import timm
import torch

import vitkit as vk
from vitkit.models import cvt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random CvT in transformers' layout; weights scaled (sharp attention: the score scale matters) and
    BatchNorm statistics randomised (so running stats, not batch stats, must be used)."""
    torch.manual_seed(0)
    cfg = transformers.CvtConfig(embed_dim=[16, 24, 32], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=5)
    hf = transformers.CvtForImageClassification(cfg).eval()
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10)
    folder = tmp_path_factory.mktemp("hf-cvt")
    hf.save_pretrained(folder)
    return folder, hf


def test_logits_equal_transformers(hf_folder):
    folder, hf = hf_folder
    model = vk.load(folder, any_model=True).eval()
    assert isinstance(model, cvt.CvT) and model.num_prefix_tokens == 1
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        got = model(x)
    assert want.abs().max() > 0.5  # not a degenerate near-zero output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_timm_style_surface(hf_folder):
    model = vk.load(hf_folder[0], any_model=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        final, maps = model.forward_intermediates(x)
    assert tokens.shape == (2, 1 + 4 * 4, 32)  # 64 px / (4·2·2) = 4x4 patches + the last stage's class token
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4)]
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(final, tokens)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    # gradient checkpointing: same output and gradients
    model.train()
    for m in model.modules():  # keep BatchNorm statistics fixed so both passes see the same function
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), model.stages[0].patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_registered_in_timm_and_saved_by_vitkit(hf_folder, tmp_path):
    assert {"cvt_13", "cvt_21", "cvt_w24"} <= set(timm.list_models("cvt*"))
    small = timm.create_model("cvt_13", pretrained=False, num_classes=3, embed_dims=(8, 16, 16), depths=(1, 1, 1),
                              num_heads=(1, 2, 2))
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model = vk.load(hf_folder[0], num_classes=3, any_model=True)  # a new (random, untrained) head for another class count
    vk.adapt(model, "bitfit")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(0.1)
    vk.save(model, tmp_path / "saved")
    again = vk.load(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x))


def test_unsupported_config_is_refused():
    cfg = transformers.CvtConfig().to_dict()
    cfg["cls_token"] = [False, True, True]
    with pytest.raises(ValueError, match="class token in the last stage only"):
        cvt.hf_args(cfg)
    cfg["cls_token"], cfg["qkv_projection_method"] = [False, False, True], ["avg", "avg", "avg"]
    with pytest.raises(ValueError, match="qkv_projection_method"):
        cvt.hf_args(cfg)
