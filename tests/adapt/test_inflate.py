"""vitkit/models/inflate.py, the helper behind every input adapter: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- pretrained kernels with other than 3 channels, per-channel
statistics that differ, a patch conv with padding / no bias / float64, non-square pretrained grids,
`no_embed_class` models, frames of another size than the pretrained images, and the refusals. The expected values
are built in plain torch from the untouched model's tensors; nothing from vitkit computes them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant
from vitkit.models.inflate import inflate_weight, input_conv, install_embed, replace_input_conv, resize_grid


def bicubic(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch positions (1, gh, gw, D) -> (1, h*w, D) on `size` (bicubic, antialiased, as timm resamples)."""
    out = F.interpolate(grid.permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.flatten(2).transpose(1, 2)


def test_inflate_weight_from_kernels_with_four_channels():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 2, 2)
    got = inflate_weight(w, [3, "sum", "mean", "zero", 0])
    total = w[:, 0] + w[:, 1] + w[:, 2] + w[:, 3]
    torch.testing.assert_close(got, torch.stack([w[:, 3], total, total / 4, 0 * total, w[:, 0]], 1))
    with pytest.raises(ValueError, match="inflate: source channel 4 out of range for 4 pretrained channels"):
        inflate_weight(w, [4])
    with pytest.raises(ValueError, match="inflate: unknown source 'avg'; use a channel index"):
        inflate_weight(w, ["avg"])


def test_paired_after_channels_inflates_the_five_band_kernels():
    """channels (5 bands) then paired early fusion: kernels (D, 10) = the 5 band kernels, then zeros."""
    model = vk.adapt(make_variant("plain", seed=20), "channels", bands=("B02", "B03", "B04", "B08", "B11"),
                     rgb=("B04", "B03", "B02"), rest="mean")
    w5 = model.patch_embed.proj.weight.detach().clone()
    reference = copy.deepcopy(model)
    vk.adapt(model, "paired")
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), torch.cat([w5, torch.zeros_like(w5)], 1))
    tile = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([tile, torch.randn_like(tile)], 1)), reference(tile),
                                   atol=1e-5, rtol=1e-5)


def test_statistics_follow_each_channels_source():
    """A pretrained channel keeps its own mean/std, the others take the average; paired's `stats` override."""
    mean, std = (0.1, 0.2, 0.6), (0.3, 0.4, 0.8)
    model = make_variant("plain")
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=mean, std=std)
    vk.adapt(model, "channels", bands=("B02", "B03", "B04", "B08"), rgb=("B04", "B03", "B02"), rest="zero")
    assert model.pretrained_cfg["mean"] == pytest.approx((0.6, 0.2, 0.1, 0.3))
    assert model.pretrained_cfg["std"] == pytest.approx((0.8, 0.4, 0.3, 0.5))
    model = make_variant("plain")
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=mean, std=std)
    vk.adapt(model, "paired")  # kernels (R, G, B, 0, 0, 0); statistics (R, G, B, R, G, B)
    assert model.pretrained_cfg["mean"] == pytest.approx(mean * 2)
    assert model.pretrained_cfg["std"] == pytest.approx(std * 2)


def test_replace_input_conv_keeps_padding_stride_no_bias_and_dtype():
    """Any Conv2d patch projection: the new one has its geometry, no bias where it had none, its dtype; a model
    without a `pretrained_cfg` keeps none."""
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = old = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False).double()
    new = replace_input_conv(model, [2, 1, 0], "channels")
    assert model.patch_embed.proj is new and new.bias is None and new.weight.dtype == torch.float64
    assert (new.kernel_size, new.stride, new.padding) == ((3, 3), (2, 2), (1, 1))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():  # kernels (B, G, R): the old conv on the channel-reversed image
        torch.testing.assert_close(new(x), F.conv2d(x.flip(1), old.weight, stride=2, padding=1))
    assert not hasattr(model, "pretrained_cfg")


def test_refusals_name_the_method_and_what_was_found():
    model = nn.Module()
    with pytest.raises(NotImplementedError, match="video: needs a timm patch embedding whose `proj` is a Conv2d, "
                                                  "got NoneType; apply input adapters first, before methods"):
        input_conv(model, "video")
    model.patch_embed = nn.Module()
    model.patch_embed.proj = nn.Linear(3, 8)
    with pytest.raises(NotImplementedError, match="channels: needs .* got Linear; apply input adapters first"):
        replace_input_conv(model, [0], "channels")
    with pytest.raises(NotImplementedError, match="points: needs a learned absolute position embedding "
                                                  "\\(`pos_embed`\\) to take positions from; this model has none"):
        install_embed(model, nn.Identity(), "points")


def test_resize_grid_from_a_non_square_grid_without_prefix_positions():
    """pos_embed of a `no_embed_class` model (class token, no prefix entries) on an 8x12 pretrained grid,
    resampled to 4x8; a frozen pos_embed stays frozen; one-patch rows and columns are valid sizes."""
    model = make_variant("plain", seed=21, img_size=(32, 48), no_embed_class=True)
    pos = model.pos_embed.detach().clone()  # (1, 96, D): patches only
    model.pos_embed.requires_grad_(False)
    resize_grid(model, (16, 32), "spectrogram")
    expected = bicubic(pos.reshape(1, 8, 12, -1), (4, 8))
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert not model.pos_embed.requires_grad
    pe = model.patch_embed
    assert (pe.img_size, pe.grid_size, pe.num_patches) == ((16, 32), (4, 8), 32)
    assert model(torch.randn(1, 3, 16, 32)).shape == (1, 10)
    resize_grid(model, (4, 48), "spectrogram")
    resize_grid(model, (32, 4), "spectrogram")
    assert pe.grid_size == (8, 1)
    for bad in ((0, 48), (32, 0), (6, 48)):
        with pytest.raises(ValueError, match="spectrogram: `img_size` .* must be a positive multiple of the patch"):
            resize_grid(model, bad, "spectrogram")


def test_video_frames_of_another_size_on_a_no_embed_class_model():
    """Token embeddings take positions from the (8x12, non-square) pretrained grid resampled to the frames' grid;
    the class token of a `no_embed_class` model gets no position."""
    model = make_variant("plain", seed=22, img_size=(32, 48), no_embed_class=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vk.adapt(model, "video", num_frames=2, tubelet=2)
    with torch.no_grad():
        model.patch_embed.time_embed.normal_()
    clip = torch.randn(2, 3, 2, 16, 24)  # 4x6 patches a frame
    w = sd["patch_embed.proj.weight"]
    with torch.no_grad():
        tokens = F.conv2d(clip[:, :, 0], w / 2, sd["patch_embed.proj.bias"], stride=4) \
            + F.conv2d(clip[:, :, 1], w / 2, stride=4)  # replicate: each frame's kernel is the 2-D one / 2
        tokens = tokens.flatten(2).transpose(1, 2) + bicubic(sd["pos_embed"].reshape(1, 8, 12, -1), (4, 6)) \
            + model.patch_embed.time_embed[:, 0]
        expected = torch.cat([sd["cls_token"].expand(2, -1, -1), tokens], 1)
        torch.testing.assert_close(model._pos_embed(model.patch_embed(clip)), expected, atol=1e-5, rtol=1e-5)
