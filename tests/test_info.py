"""vk.info on models that are not ViTs: parameters and FLOPs, no token layout (before: a TypeError from
token_layout); a model that states no input size is a clear error naming the fix."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import vitkit as vk
from vitkit.cli import main


def test_a_small_convnet_counts_its_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    info = vk.info(model, input_size=16)
    # conv: 14x14 outputs x 8 channels x 3*3*3 MACs; linear: 8x2 (bias adds and pooling are not MACs)
    assert info.gmacs * 1e9 == pytest.approx(14 * 14 * 8 * 27 + 8 * 2)
    assert (info.total_params, info.input_size, info.layout) == (3 * 8 * 9 + 8 + 8 * 2 + 2, (3, 16, 16), None)
    assert "tokens      - (not a ViT)" in str(info)
    with pytest.raises(ValueError, match="vk.info: Sequential is not a ViT and states no input size.*input_size="):
        vk.info(model)


def test_a_timm_resnet_reports_params_head_and_flops(capsys):
    model = vk.load("resnet18", pretrained=False, any_model=True, num_classes=10)
    info = vk.info(model, input_size=32)
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert info.head_params == 512 * 10 + 10  # get_classifier(): `fc`
    assert info.gmacs > 0 and info.input_size == (3, 32, 32)
    assert main(["info", "resnet18", "--no-pretrained", "--num-classes", "10", "--input-size", "32", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["num_prefix_tokens"] is None
    with pytest.raises(TypeError, match="token_layout: expected a timm VisionTransformer, got ResNet"):
        vk.token_layout(model)
