"""`prune` (Essential Sparsity, spec B1) against independent plain-torch oracles written from the spec: global and
per-layer magnitude masks (exact counts, max |pruned| <= min |kept|), N:M groups (also against torch.ao's own
WeightNormSparsifier), masks that survive deepcopy, an optimiser step, fine-tuning and save/load; identity at
sparsity 0 on every variant; compositions (LoRA unmerged -> prune, prune -> fit -> save/load); bad input."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

import vitkit as vk
from conftest import VARIANTS, make_variant

TARGET = re.compile(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")  # the spec's default set


def targets(model):
    """Name -> Linear of the spec's default targets (plain torch: module names only)."""
    return {n: m for n, m in model.named_modules() if TARGET.fullmatch(n)}


def weights_of(model):
    return {n: m.weight.detach().clone() for n, m in targets(model).items()}


def oracle_global(weights: dict, s: float) -> dict:
    """Zero the round(s·n) smallest |w| pooled over every target (stable sort, plain torch)."""
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    k = round(s * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.argsort(stable=True)[:k]] = False
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = w * keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return out


def oracle_layer(weights: dict, s: float) -> dict:
    return {name: oracle_global({name: w}, s)[name] for name, w in weights.items()}


def oracle_nm(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per output row, groups of m consecutive inputs: keep the n largest |w| (a full sort per group)."""
    groups = w.reshape(w.shape[0], -1, m)
    idx = groups.abs().argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.zeros_like(groups).scatter(-1, idx, groups.gather(-1, idx)).reshape(w.shape)


def with_weights(model, weights: dict):
    """A copy of the *unpruned* model carrying `weights`: the oracle's model."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in targets(other).items():
            m.weight.copy_(weights[name])
    return other


# -------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_sparsity_zero_is_identity(variant_name, images):
    model = make_variant(variant_name)
    reference = copy.deepcopy(model)
    vk.compress(model, "prune", sparsity=0.0)
    assert len(vk.compress.prune._common.masked_layers(model)) == 4 * len(model.blocks)  # the real path ran
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_global_matches_oracle_exact_count_and_order(s, images):
    model = make_variant("qk_norm")
    before = weights_of(model)
    expected = oracle_global(before, s)
    reference = with_weights(model, expected)
    vk.compress(model, "prune", sparsity=s)
    after = weights_of(model)
    n = sum(w.numel() for w in before.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == round(s * n), (zeros, round(s * n))
    pruned = torch.cat([before[k][after[k] == 0].abs() for k in before])
    kept = torch.cat([before[k][after[k] != 0].abs() for k in before])
    assert pruned.max() <= kept.min(), (pruned.max(), kept.min())
    for name in before:
        torch.testing.assert_close(after[name], expected[name], atol=0, rtol=0)
    counts = {round(float((after[k] == 0).float().mean()), 2) for k in after}
    assert len(counts) > 1, "global pruning left every layer at the same sparsity: that is per-layer pruning"
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-6, rtol=1e-6)


def test_layer_scope_every_tensor_at_exactly_s(images):
    model = make_variant("layerscale")
    before = weights_of(model)
    expected = oracle_layer(before, 0.6)
    vk.compress(model, "prune", sparsity=0.6, scope="layer")
    for name, w in weights_of(model).items():
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name
        assert before[name][w == 0].abs().max() <= before[name][w != 0].abs().min(), name
        torch.testing.assert_close(w, expected[name], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), with_weights(make_variant("layerscale"), expected)(images),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_exact_per_group_and_matches_oracles(pattern, images):
    from torch.ao.pruning import WeightNormSparsifier

    n, m = map(int, pattern.split(":"))
    model = make_variant("registers")
    before = weights_of(model)
    vk.compress(model, "prune", pattern=pattern)
    for name, w in weights_of(model).items():
        per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert bool((per_group == n).all()), f"{name}: non-zeros per group {per_group.unique().tolist()}, want {n}"
        torch.testing.assert_close(w, oracle_nm(before[name], n, m), atol=0, rtol=0)
    # torch's own N:M sparsifier (zeros_per_block = m - n along in_features) on one layer agrees
    name = "blocks.1.mlp.fc1"
    layer = nn.Sequential(nn.Linear(*before[name].shape[::-1]))
    with torch.no_grad():
        layer[0].weight.copy_(before[name])
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n)
    sparsifier.prepare(layer, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    torch.testing.assert_close(weights_of(model)[name], layer[0].weight.detach(), atol=0, rtol=0)


def test_patch_embed_and_head_only_when_asked():
    model = make_variant("plain")
    vk.compress(model, "prune", sparsity=0.5)
    assert not (model.patch_embed.proj.weight == 0).any() and not (model.head.weight == 0).any()
    model = make_variant("plain")
    vk.compress(model, "prune", sparsity=0.5, targets=("patch_embed", "head"), scope="layer")
    assert (model.patch_embed.proj.weight == 0).float().mean() == 0.5 and (model.head.weight == 0).float().mean() == 0.5
    assert not any((w == 0).any() for w in weights_of(model).values())


# ---------------------------------------------------------------------------------- masks hold, save, load
def test_masks_survive_deepcopy_optimiser_step_and_make_permanent(images):
    model = make_variant("plain").train()
    vk.compress(model, "prune", sparsity=0.5)
    zeros = {k: w == 0 for k, w in weights_of(model).items()}
    copied = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(images).square().mean().backward()
    opt.step()
    for name, w in weights_of(model).items():
        assert bool((w[zeros[name]] == 0).all()), name
    assert any(not torch.equal(a, b) for a, b in zip(weights_of(model).values(), weights_of(copied).values()))
    model.eval()
    with torch.no_grad():
        expected = model(images)
        vk.compress.prune.make_permanent(model)
        torch.testing.assert_close(model(images), expected, atol=0, rtol=0)
        copied.eval()(images)  # the deep copy keeps its masks (torch shares the parametrised class with copies)
    assert type(model.blocks[0].attn.qkv) is nn.Linear and "blocks.0.attn.qkv.weight" in model.state_dict()
    assert vk.applied(model)[0].config.permanent


def test_saved_mask_is_one_bit_per_weight_and_reloads(tmp_path, images):
    model = vk.load("vitkit/vit-tiny-cifar")  # a pretrained base: the save holds only what changed
    x = torch.randn(2, 3, 32, 32)
    vk.compress(model, "prune", sparsity=0.5)
    saved = vk.save(model, tmp_path / "p")
    from safetensors import safe_open

    with safe_open(str(saved / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        masks = {k: f.get_tensor(k) for k in keys if k.endswith(".mask")}
    assert keys and all(k.endswith(".mask") for k in keys), keys  # the unchanged weights are not stored
    n = sum(m.weight.numel() for m in targets(model).values())
    assert sum(v.numel() for v in masks.values()) == n // 8 and all(v.dtype == torch.uint8 for v in masks.values())
    loaded = vk.load(saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)
    vk.compress.prune.make_permanent(model)
    loaded = vk.load(vk.save(model, tmp_path / "q")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert type(loaded.blocks[0].mlp.fc1) is nn.Linear


# ---------------------------------------------------------------------------------------------- composition
def test_lora_unmerged_then_prune_prunes_the_merged_weight(images):
    model = make_variant("plain")
    widths = {name: m.in_features for name, m in targets(model).items()}
    vk.adapt(model, "lora", rank=4, targets=("q", "v", "fc1"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    # the merged weight, probed from the adapted layer itself: layer(I) - layer(0) = W_eff^T (plain torch)
    merged = {}
    with torch.no_grad():
        for name, m in targets(model).items():
            eye = torch.eye(widths[name])
            merged[name] = (m(eye) - m(torch.zeros(1, widths[name]))).T
    expected = oracle_global(merged, 0.5)
    vk.compress(model, "prune", sparsity=0.5)
    assert [a.name for a in vk.applied(model)] == ["prune"]  # lora merged away: nothing left of it
    for name, w in weights_of(model).items():
        torch.testing.assert_close(w, expected[name], atol=1e-6, rtol=1e-5)


def test_prune_then_fit_then_save_load(tmp_path, images):
    model = make_variant("no_cls_avg")
    vk.compress(model, "prune", sparsity=0.7, scope="layer")
    vk.adapt(model, "full")
    zeros = {k: w == 0 for k, w in weights_of(model).items()}
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    before = weights_of(model)
    vk.fit(model, data, epochs=1, batch_size=8, lr=1e-2, out_dir=tmp_path / "run", progress=False, save_model=False)
    after = weights_of(model)
    assert any(not torch.equal(before[k], after[k]) for k in after), "fit moved nothing"
    for name, w in after.items():
        assert bool((w[zeros[name]] == 0).all()), f"{name}: fine-tuning revived pruned weights"
    model.eval()
    loaded = vk.load(vk.save(model, tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), r"prune: `sparsity` must be in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), r"prune: `sparsity` must be in \[0, 1\), got -0.1"),
    (dict(pattern="2:5"), r"prune: pattern 2:5 needs the input width to be a multiple of M=5; blocks.0.attn.proj "
                          r"has width 64"),
    (dict(pattern="2:4", sparsity=0.3), r"prune: `pattern` 2:4 fixes the sparsity at 0.5; got sparsity=0.3"),
    (dict(pattern="two:four"), r"prune: `pattern` must be 'N:M'.*'two:four'"),
    (dict(targets=("nothing_here",)), r"prune: target `nothing_here` matches no layer"),
])
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.compress(make_variant("plain"), "prune", **kwargs)


def test_semi_structured_kernels_refused_on_cpu():
    model = make_variant("plain")
    vk.compress(model, "prune", pattern="2:4")
    with pytest.raises(NotImplementedError, match="model is on cpu .*sparsity saves no time"):
        vk.compress.prune.to_semi_structured(model)
