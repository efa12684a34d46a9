"""Dense head (PhilEO's per-patch head on intermediate tokens): its output against a plain-torch oracle written from
../shared/methods/applications.md entry 19 (which blocks, which tokens dropped, the order of the patch grid), mIoU and
MSE against hand-computed values, training through vk.fit, save/load, and the refusals. The oracle walks the blocks
from the model's state dict and imports nothing from vitkit."""
from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from vitkit.adapt import dense_algo
from vitkit.data.generators import tile_maps, tile_scenes

HEADS = 4
TINY = dict(patch_size=4, embed_dim=32, depth=4, num_heads=HEADS, num_classes=3)


def tiny(img_size=(32, 48), seed=0, **extra):
    torch.manual_seed(seed)
    return vk.load("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **{**TINY, **extra}).eval()


def oracle(sd: dict, x: torch.Tensor, blocks: list[int], combine: str, norm: bool, upsample: bool,
           eps: float = 1e-6) -> torch.Tensor:
    """(B, K, gh, gw) (or (B, K, H, W)): the tokens after `blocks` (LayerNorm'd with the final norm when `norm`),
    prefix (class, registers) dropped, patches laid out row by row, concatenated or summed, one Linear per patch."""
    lin = lambda n, t: F.linear(t, sd[f"{n}.weight"], sd.get(f"{n}.bias"))  # noqa: E731
    ln = lambda n, t: F.layer_norm(t, t.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], eps)  # noqa: E731
    w = sd["patch_embed.proj.weight"]
    B, gh, gw = len(x), x.shape[-2] // w.shape[-2], x.shape[-1] // w.shape[-1]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    prefix = [sd[k].expand(B, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    p = sum(q.shape[1] for q in prefix)
    if sd["pos_embed"].shape[1] == gh * gw:  # no_embed_class: positions on the patches only
        t = torch.cat(prefix + [t + sd["pos_embed"]], 1)
    else:
        t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    n, d = t.shape[1:]
    taken = []
    for i in range(max(blocks) + 1):
        blk = f"blocks.{i}."
        q, k, v = lin(blk + "attn.qkv", ln(blk + "norm1", t)).reshape(B, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), -1) @ v
        t = t + lin(blk + "attn.proj", a.transpose(1, 2).reshape(B, n, d))
        t = t + lin(blk + "mlp.fc2", F.gelu(lin(blk + "mlp.fc1", ln(blk + "norm2", t))))
        if i in blocks:
            y = ln("norm", t) if norm and "norm.weight" in sd else t  # avg-pool models: timm's norm is Identity
            taken.append(y[:, p:].reshape(B, gh, gw, d))  # row-major patch order
    feats = torch.cat(taken, -1) if combine == "concat" else sum(taken)
    out = lin("dense_head.proj", feats).permute(0, 3, 1, 2)
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False) if upsample else out


CASES = [  # (model variant, dense config)
    pytest.param({}, dict(blocks=(1, 3)), id="cls-concat"),
    pytest.param(dict(reg_tokens=4), dict(blocks=(-1, 1), norm=False), id="registers-concat-nonorm"),
    pytest.param(dict(reg_tokens=4, class_token=False, no_embed_class=True, global_pool="avg"),
                 dict(blocks=(0, 2), combine="sum"), id="reg-no-cls-sum"),
    pytest.param(dict(class_token=False, global_pool="avg"), dict(blocks=(2,), upsample=True), id="no-cls-upsample"),
]


@pytest.mark.parametrize("variant,cfg", CASES)
def test_output_equals_oracle(variant, cfg):
    model = tiny(**variant)
    vk.adapt(model, "dense", **cfg)
    with torch.no_grad():  # a non-zero head, so that every token it reads matters
        model.dense_head.proj.weight.normal_()
        model.dense_head.proj.bias.normal_()
    x = torch.randn(2, 3, 32, 48)  # non-square: a transposed grid would differ
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    blocks = sorted(b % 4 for b in cfg["blocks"])
    with torch.no_grad():
        got = model(x)
        want = oracle(sd, x, blocks, cfg.get("combine", "concat"), cfg.get("norm", True), cfg.get("upsample", False))
    assert got.shape == ((2, 3, 32, 48) if cfg.get("upsample") else (2, 3, 8, 12))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_any_input_size_and_gradient_checkpointing():
    model = tiny(img_size=32, dynamic_img_size=True, reg_tokens=2)
    vk.adapt(model, "dense", blocks=(1, 2))
    x = torch.randn(2, 3, 16, 40)
    assert model(x).shape == (2, 3, 4, 10)
    model.train()
    target = torch.randint(0, 3, (2, 4, 10))
    _, loss, _ = model(x, target)
    loss.backward()
    plain = model.dense_head.proj.weight.grad.clone()
    model.dense_head.proj.weight.grad = None
    model.set_grad_checkpointing(True)
    _, loss_ckpt, _ = model(x, target)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(model.dense_head.proj.weight.grad, plain)


def test_metrics_against_hand_computed_values():
    pred = torch.tensor([[0, 0, 1], [2, 2, 2]])
    target = torch.tensor([[0, 1, 1], [2, 2, 0]])
    # class 0: TP 1 of union 3; class 1: 1 of 2; class 2: 2 of 3; class 3 absent from both: left out
    assert dense_algo.miou(pred, target, 4) == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3)
    matrix = dense_algo.confusion(pred, target, 4)  # rows: true class
    assert matrix[0].tolist() == [1, 0, 1, 0] and matrix[:, 2].tolist() == [1, 0, 2, 0]
    assert dense_algo.iou_from_confusion(matrix)[1][3] is None
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1, :] = True  # one row: a quarter of each 4x4 cell in the top row of cells
    mask[4:6, 4:8] = True  # half of the bottom-right cell
    assert dense_algo.density(mask, 4).tolist() == [[0.25, 0.25], [0.0, 0.5]]


def _train_eval(task, outputs, targets_of, tmp):
    model = tiny(img_size=32)
    vk.adapt(model, "dense", task=task, outputs=outputs, blocks=(2, 3))
    x, cover, dens = tile_scenes(12, np.random.default_rng(0))
    rgb = x[:, [2, 1, 0]]
    data = torch.utils.data.TensorDataset(rgb, targets_of(cover, dens))
    result = vk.fit(model, data, epochs=3, batch_size=4, out_dir=tmp, progress=False, save_model=False)
    return model, data, result


def test_segment_trains_evaluates_and_round_trips(tmp_path):
    model, data, result = _train_eval("segment", 4, lambda c, d: c, tmp_path / "run")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"], result.history
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"dense_head.proj.weight",
                                                                            "dense_head.proj.bias"}
    report = vk.evaluate(model, data, protocol="dense")
    with torch.no_grad():
        pred = model(data.tensors[0]).argmax(1)
    y = data.tensors[1]
    ious = [((pred == c) & (y == c)).sum().item() / ((pred == c) | (y == c)).sum().item() for c in range(4)
            if ((pred == c) | (y == c)).any()]
    assert report["miou"] == pytest.approx(sum(ious) / len(ious))
    assert report["pixel_acc"] == pytest.approx((pred == y).float().mean().item())
    vk.save(model, tmp_path / "saved")
    loaded = vk.load(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.tensors[0]), model(data.tensors[0]), atol=1e-6, rtol=1e-6)


def test_fit_counts_images_not_patches_and_reports_patch_accuracy(tmp_path):
    """`vk.fit`'s figures on a dense head: images/s counts the 12 images an epoch sees (not 12 x 64 patches),
    `train_acc` is the per-patch accuracy when segmenting and absent when regressing."""
    _, _, result = _train_eval("segment", 4, lambda c, d: c, tmp_path / "segment")
    epoch = result.history[-1]
    assert epoch["img_per_s"] * epoch["epoch_time_s"] == pytest.approx(12, rel=1e-3)
    assert 0 <= epoch["train_acc"] <= 1
    _, _, result = _train_eval("regress", 2, lambda c, d: d, tmp_path / "regress")
    assert "train_acc" not in result.history[-1]


def test_regress_mse(tmp_path):
    model, data, _ = _train_eval("regress", 2, lambda c, d: d, tmp_path)
    report = vk.evaluate(model, data, protocol="dense")
    with torch.no_grad():
        err = (model(data.tensors[0]) - data.tensors[1]) ** 2
    assert report["mse"] == pytest.approx(err.mean().item(), rel=1e-5)
    assert report["per_output_mse"] == pytest.approx(err.mean((0, 2, 3)).tolist(), rel=1e-5)


def test_composes_with_channels_and_keeps_what_it_trains():
    model = tiny(img_size=32)
    vk.adapt(model, "channels", train_head=False)
    vk.adapt(model, "dense", outputs=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"patch_embed.proj.weight", "patch_embed.proj.bias", "dense_head.proj.weight",
                         "dense_head.proj.bias"}
    assert model(torch.randn(1, 10, 32, 32)).shape == (1, 4, 8, 8)


def test_composes_with_prompts_and_merging_and_round_trips(tmp_path):
    model = tiny(img_size=32)
    vk.adapt(model, "vpt", num_prompts=3)
    vk.adapt(model, "dense", blocks=(1, 3))
    vk.accelerate(model, "tome", r=4)  # merged tokens are unmerged onto the grid by the runner
    with torch.no_grad():
        model.dense_head.proj.weight.normal_()
        x = torch.randn(2, 3, 32, 32)
        assert model(x).shape == (2, 3, 8, 8)
        vk.save(model, tmp_path / "saved")
        loaded = vk.load(tmp_path / "saved")
        assert [a.name for a in vk.applied(loaded)] == ["vpt", "dense", "tome"]
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)


def test_tile_scenes_keep_tile_maps_and_give_densities():
    x, cover, dens = tile_scenes(3, np.random.default_rng(5))
    x0, cover0 = tile_maps(3, np.random.default_rng(5))
    assert torch.equal(cover, cover0)  # the land cover is tile_maps' (same draws first)
    assert 0.5 < (x == x0).float().mean() < 0.97  # roads and buildings drawn over part of it
    assert dens.shape == (3, 2, 8, 8) and (dens * 16 == (dens * 16).round()).all() and (dens.sum(1) <= 1).all()
    assert (dens[:, 0].flatten(1).amax(1) > 0).all() and (dens[:, 1].flatten(1).amax(1) > 0).all()


@pytest.mark.parametrize("call,match", [
    (lambda m: vk.adapt(m, "dense", blocks=(4,)), r"dense: `blocks` \[4\] out of range for a 4-block model"),
    (lambda m: vk.adapt(m, "dense", blocks=(1, -3)), r"name the same block twice"),
    (lambda m: vk.adapt(m, "dense", outputs=-1), r"`outputs` must be >= 0"),
    (lambda m: vk.adapt(m, "dense", combine="mean"), r"`combine` must be"),
    (lambda m: vk.evaluate(m, torch.utils.data.TensorDataset(torch.randn(2, 3, 32, 32), torch.zeros(2)), "dense"),
     "protocol `dense` needs a dense head"),
])
def test_refuses_bad_config_in_one_line(call, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        call(tiny(img_size=32))
    assert "\n" not in str(err.value)


def test_refuses_bad_targets_and_val_in_one_line():
    model = vk.adapt(tiny(img_size=32), "dense")
    x = torch.randn(2, 3, 32, 32)
    for targets, match in ((torch.zeros(2, dtype=torch.long), r"must be class indices of shape \(B, 8, 8\)"),
                           (torch.full((2, 8, 8), 3), r"must lie in \[0, 2\]"),
                           (torch.zeros(2, 8, 8), r"must be class indices")):
        with pytest.raises(ValueError, match=match) as err:
            model(x, targets)
        assert "\n" not in str(err.value)
    data = torch.utils.data.TensorDataset(x, torch.zeros(2, 8, 8, dtype=torch.long))
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(ValueError, match="protocol='dense'"):
        vk.fit(model, data, data, epochs=1, out_dir=tmp, progress=False)
    regress = vk.adapt(tiny(img_size=32), "dense", task="regress", outputs=2)
    with pytest.raises(ValueError, match=r"regress targets must be floats of shape \(B, 2, 8, 8\)"):
        regress(x, torch.zeros(2, 8, 8))


def test_bench_refuses_dense_chains_and_leaves_it_out_of_all():
    from vitkit.bench.recipe import all_registered_chains, check_chain

    assert check_chain("dense").startswith("`dense` makes the model predict per-patch maps")
    assert "dense" not in all_registered_chains()
