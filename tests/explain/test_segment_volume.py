"""Volume segmentation by patch similarity (neural transfer functions, spec E6): constant blocks are segmented
exactly, the feature volume equals one built by hand from the blocks' keys, a click on a grid point has
similarity 1, the uint8 transfer function saturates without wrapping, bad input is refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from vitkit.cli import main
from vitkit.explain import volume_algo as algo
from vitkit.explain.volume import volume_features

from conftest import make_variant

HALF = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


def blocks(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A (12, 16, 20) volume of two constant blocks split at index 8 of `axis`; mask of the second block."""
    vol = np.full((12, 16, 20), 100.0, np.float32)
    truth = np.zeros(vol.shape, bool)
    truth[(slice(None),) * axis + (slice(8, None),)] = True
    vol[truth] = 300.0
    return vol, truth


@pytest.mark.parametrize("name,axis", [("plain", 0), ("registers", 1), ("reg_no_cls", 2)])
def test_constant_blocks_segmented_exactly(name, axis):
    model = make_variant(name, dynamic_img_size=True)
    vol, truth = blocks(axis)
    click = [(5, 3, 2), (5, 3, 2), (5, 3, 2)][axis]
    click = tuple(10 if a == axis else c for a, c in enumerate(click))  # inside the second block
    seg = vk.segment_volume(model, vol, click, patches=4, progress=False)  # 3x4x5 cells of 4 voxels
    assert seg.grid_similarity.shape == (3, 4, 5)
    assert np.array_equal(seg.mask, truth), f"{name}: {np.sum(seg.mask != truth)} voxels differ from the block"
    cells = np.moveaxis(seg.grid_similarity, axis, 0)  # cells 0, 1 hold the first block, 2.. the second
    assert cells[:2].max() == 0.0 and cells[2:].min() > 0.99, "the other block is below the floor, this one ~1"


def keys_by_hand(model, x):
    """(B, gh, gw, C) last-block keys of the patches: timm's embedding, blocks walked, qkv split by hand."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:-1]:
        t = blk(t)
    attn = model.blocks[-1].attn
    qkv = F.linear(model.blocks[-1].norm1(t), attn.qkv.weight, attn.qkv.bias)
    k = qkv[..., qkv.shape[-1] // 3: 2 * qkv.shape[-1] // 3][:, model.num_prefix_tokens:]
    return k.reshape(x.shape[0], x.shape[-2] // 4, x.shape[-1] // 4, -1)


def test_feature_volume_equals_hand_built_one():
    model = make_variant("registers", dynamic_img_size=True)
    vol = torch.rand(8, 12, 16) * 50 + 20
    got = volume_features(model, (vol - vol.min()) / (vol.max() - vol.min()), patches=6, progress=False, **HALF)
    v = (vol - vol.min()) / (vol.max() - vol.min())
    total = torch.zeros(4, 6, 8, 64)  # cells (4, 6, 8): 2 voxels each, so slices are upsampled x2 (nearest)
    with torch.no_grad():
        for a in range(3):
            imgs = v.movedim(a, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)  # (D_a, 2·Db, 2·Dc)
            x = (imgs[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5
            k = keys_by_hand(model, x)  # (D_a, Gb, Gc, C)
            k = k.reshape(k.shape[0] // 2, 2, *k.shape[1:]).mean(1)  # pairs of slices -> one cell
            total += k.movedim(0, a)
    err = (got.permute(1, 2, 3, 0) - total).abs().max().item()
    assert err <= 1e-4, f"feature volume vs hand-built keys differ by {err:.2e}"


def test_middle_axis_gets_the_patches():
    assert algo.feature_grid((33, 41, 25), 64) == (64, 80, 48)  # anatomical.nii's shape, the paper's 64
    assert algo.feature_grid((100, 10, 40), 8) == (20, 2, 8)


def test_click_on_grid_point_and_uint8_transfer_function():
    model = make_variant("qk_norm", dynamic_img_size=True)
    vol = np.random.default_rng(0).random((9, 9, 9)).astype(np.float32)
    seg = vk.segment_volume(model, vol, (4, 4, 4), patches=3, floor=0.0, progress=False)  # cells of 3 voxels
    g = seg.grid_similarity
    assert g[1, 1, 1] == pytest.approx(1.0, abs=1e-6), "voxel (4, 4, 4) is the centre of cell (1, 1, 1)"
    assert g.min() < 0.9, "the other cells are not all alike"
    tf = seg.transfer_function()
    assert tf.dtype == np.uint8 and tf.max() == 255
    assert (tf[seg.similarity >= 0.99 * seg.similarity.max()] == 255).all(), "255/(0.99·max) clamped, not wrapped"


def test_bad_input_refused():
    model = make_variant("plain")
    vol = np.zeros((8, 8, 8), np.float32)
    vol[4:] = 1
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        vk.segment_volume(model, vol, (1, 1, 1), patches=4, progress=False)  # 16 px slices, a 32 px model
    with pytest.raises(ValueError, match="outside the volume"):
        vk.segment_volume(model, vol, (8, 1, 1), patches=8, progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        vk.segment_volume(model, vol, (1, 1, 1), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="3-D volume"):
        vk.segment_volume(model, vol[0], (1, 1, 1), progress=False)
    vol[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vk.segment_volume(model, vol, (1, 1, 1), progress=False)


def test_cli_writes_three_planes_from_nifti(tmp_path, capsys):
    import nibabel

    vol, truth = blocks(1)
    path = tmp_path / "blocks.nii.gz"
    nibabel.save(nibabel.Nifti1Image(vol, np.eye(4)), path)
    tiny = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-arg", "img_size=32", "--model-arg",
            "patch_size=4", "--model-arg", "depth=2", "--model-arg", "dynamic_img_size=true"]
    out = tmp_path / "planes.png"
    assert main(["segment-volume", str(path), *tiny, "--voxel", "5,10,2", "--patches", "4", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["grid"] == [3, 4, 5] and result["mask_fraction"] == pytest.approx(truth.mean())
    assert out.stat().st_size > 0 and np.load(out.with_suffix(".npy")).shape == (12, 16, 20)
    assert main(["segment-volume", str(path), *tiny, "--voxel", "5,10,99", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the volume" in err[0]
