"""timm's patch dropout (`patch_drop_rate > 0`, training) with token reduction (issue 11.8): the source map
starts from the patches that survived, so every method trains, and maps stay exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkit as vk
from conftest import make_variant

METHODS = {"tome": dict(r=6), "evit": dict(keep_rate=0.5), "ats": dict(num_samples=24), "gtp": dict(num_prop=6)}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("variant", ["plain", "registers"])
def test_training_step_with_patch_dropout(method, variant):
    model = make_variant(variant, patch_drop_rate=0.25)
    vk.accelerate(model, method, **METHODS[method])
    model.train()
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    F.cross_entropy(model(x), y).backward()
    state = vk.get_runner(model).state
    kept = state.patch_index
    assert kept is not None and kept.shape == (3, 48)  # int(64 * 0.75) patches survived the dropout
    dropped = torch.ones(3, 64, dtype=torch.bool).scatter(1, kept, False)
    assert (state.source[dropped] == -1).all(), "a patch dropped by timm maps to no token"
    assert (state.source < state.sizes.shape[1]).all()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[5])
    source = vk.get_runner(model).state.source  # of this (training-mode) call: its own dropout draw
    assert inter[0].shape == (3, 64, 8, 8) and (source == -1).any()
    assert (inter[0].permute(0, 2, 3, 1).reshape(3, 64, 64)[source == -1] == 0).all()


@pytest.mark.parametrize("include_prefix", [False, True])
def test_tome_with_patch_dropout_oracle_identity_blocks(include_prefix):
    """Oracle: identity blocks and 'avg' pooling (final norm after pooling) -> merging the surviving patches
    must give timm's own logits with the same patch dropout draw."""
    model = make_variant("plain", patch_drop_rate=0.25, global_pool="avg", pool_include_prefix=include_prefix)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    reference = copy.deepcopy(model).train()
    vk.accelerate(model, "tome", r=8)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(5)
        ours = model(x)
        torch.manual_seed(5)
        expected = reference(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_gtp_spatial_graph_follows_the_kept_patches():
    """The spatial graph over the surviving patches links exactly the grid neighbours among them."""
    from vitkit.tokens import gtp_algo

    model = make_variant("plain", patch_drop_rate=0.5)
    vk.accelerate(model, "gtp", graph="spatial", num_prop=4)
    model.train()
    seen = {}
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.update(W=ctx.state.extra["gtp.W"]),
                             owner="probe", blocks=[0])
    torch.manual_seed(2)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    kept = vk.get_runner(model).state.patch_index
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    for b in range(2):
        r, c = rows[kept[b]], cols[kept[b]]
        near = ((r[:, None] - r[None]).abs() <= 1) & ((c[:, None] - c[None]).abs() <= 1)
        adjacency = (near & ~torch.eye(len(r), dtype=torch.bool)).float()
        torch.testing.assert_close(seen["W"][b], gtp_algo.normalise(adjacency))


def test_tome_without_source_map_does_not_keep_a_stale_one():
    model = make_variant("plain", patch_drop_rate=0.25)
    vk.accelerate(model, "tome", r=6, unmerge=False)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert vk.get_runner(model).state.source is None
        with pytest.raises(ValueError, match="no source map"):
            model.forward_intermediates(torch.randn(2, 3, 32, 32))
