"""Grad-CAM through pytorch-grad-cam with vitkit's layout-aware reshape: equals the library's stock ViT recipe
where that recipe works, and runs where it fails (registers, another input size, merged tokens)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

import vitkit as vk
from vitkit.explain.attention import fused_flags

from conftest import make_variant


def stock_cam(model, x, target, grid):
    with GradCAM(model=model, target_layers=[model.blocks[-1].norm1],
                 reshape_transform=partial(vit_reshape_transform, height=grid[0], width=grid[1])) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0]))


def test_equals_stock_recipe_on_plain_vit(images):
    model = make_variant("plain")
    e = vk.explain(model, images, method="gradcam", target=3)
    assert all(p.grad is None for p in model.parameters()), "no gradients left on the model"
    ref = stock_cam(model, images, 3, (8, 8))
    assert e.target == [3, 3]
    assert (e.heatmap - ref).abs().max() <= 1e-5, "same CAM as the library's own ViT reshape on a plain ViT"


def test_registers_where_stock_reshape_fails(images):
    model = make_variant("registers")
    with pytest.raises(RuntimeError):
        stock_cam(model, images, 3, (8, 8))  # drops one prefix token of five
    e = vk.explain(model, images, method="gradcam", target=3)
    assert e.heatmap.shape == (2, 32, 32) and e.patch_map.shape == (2, 8, 8)
    assert torch.isfinite(e.heatmap).all() and e.patch_map.sum() > 0


def test_non_default_input_size_where_stock_reshape_fails():
    model = make_variant("plain", dynamic_img_size=True)
    x = torch.randn(1, 3, 48, 40)
    with pytest.raises(RuntimeError):
        stock_cam(model, x, 1, (8, 8))  # the 8x8 grid of the default size
    e = vk.explain(model, x, method="gradcam")
    assert e.heatmap.shape == (1, 48, 40) and e.patch_map.shape == (1, 12, 10)
    assert e.target == [int(model(x).argmax())]
    assert all(fused_flags(model))


def test_after_token_merging_if_available(images):
    if "tome" not in {m.name for m in vk.methods()}:
        pytest.skip("tome not registered yet")
    model = make_variant("reg_no_cls")
    vk.accelerate(model, "tome", r=4)
    e = vk.explain(model, images, method="gradcam", layer=-1)
    assert e.patch_map.shape == (2, 8, 8) and torch.isfinite(e.heatmap).all()
