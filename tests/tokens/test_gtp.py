"""GTP-ViT: identity at P=0, counts, graph structure, pruning limit, sizes vs a dense recomputation."""
from __future__ import annotations

import copy

import pytest
import torch

import vitkit as vk
from conftest import VARIANTS, make_variant
from vitkit.tokens import gtp_algo as algo


@pytest.mark.parametrize("name", list(VARIANTS))
def test_p0_is_identity(name, images):
    model = make_variant(name)
    reference = copy.deepcopy(model)
    vk.accelerate(model, "gtp", num_prop=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)
    assert all(b.attn.fused_attn for b in model.blocks)


@pytest.mark.parametrize("name", ["plain", "registers", "reg_no_cls"])
def test_counts_and_prefix(name, images):
    model = make_variant(name)
    vk.accelerate(model, "gtp", num_prop=5)
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(
        (x.shape[1], ctx.state.sizes, ctx.state.source)), owner="probe")
    with torch.no_grad():
        model(images)
    p = model.num_prefix_tokens
    assert [s[0] for s in seen] == [p + 64 - 5 * (l + 1) for l in range(6)]
    for _, sizes, source in seen:
        assert (sizes[:, :p] == 1).all() and ((source >= p) | (source == -1)).all()


def test_spatial_graph_degrees_and_symmetry():
    g = algo.spatial_graph(5, 6)
    deg = g.sum(1).reshape(5, 6)
    assert deg[0, 0] == 3 and deg[0, 5] == 3 and deg[4, 0] == 3 and deg[4, 5] == 3
    assert deg[0, 2] == 5 and deg[2, 0] == 5
    assert deg[2, 3] == 8
    w = algo.normalise(g)
    torch.testing.assert_close(w, w.T)
    assert (g.diagonal() == 0).all()


def test_semantic_graph_excludes_self():
    x = torch.randn(2, 20, 8)
    g = algo.semantic_graph(x, 4)
    assert (g.sum(-1) == 4).all() and (g.diagonal(dim1=1, dim2=2) == 0).all()


def _capture(model, block):
    runner = vk.get_runner(model)
    got = {}
    runner.add("after_attn", lambda x, ctx: got.__setitem__("before", x), owner="probe", blocks=[block])
    return got


def test_alpha0_without_token_scale_is_pure_pruning(images):
    model = make_variant("registers")
    got = _capture(model, 2)
    vk.accelerate(model, "gtp", num_prop=6, alpha=0.0, token_scale=False)
    vk.get_runner(model).add("after_attn", lambda x, ctx: got.__setitem__("after", x), owner="probe", blocks=[2])
    model.blocks[2].attn.attn_drop.register_forward_hook(lambda m, a, out: got.__setitem__("attn", out))
    with torch.no_grad():
        model(images)
    p = 5
    prop, keep = algo.split(algo.rank(got["attn"], p), 6)
    expected = torch.cat([got["before"][:, :p], got["before"][:, p:].gather(
        1, keep.unsqueeze(-1).expand(-1, -1, 64))], dim=1)
    torch.testing.assert_close(got["after"], expected, atol=0, rtol=0)


def test_sizes_match_dense_recomputation(images):
    model = make_variant("plain")
    vk.accelerate(model, "gtp", num_prop=7, alpha=0.3, graph="spatial")
    got = {}
    for i in range(2):
        model.blocks[i].attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out))
    seen = []
    vk.get_runner(model).add("after_block", lambda x, ctx: seen.append(ctx.state.sizes.clone()), owner="probe")
    with torch.no_grad():
        model(images)
    w = algo.normalise(algo.spatial_graph(8, 8))
    sizes, alive = torch.ones(2, 64), torch.arange(64).expand(2, 64)
    for i in range(2):  # dense: over the original patch indices
        prop, keep = algo.split(algo.rank(got[i], 1), 7)
        new = []
        for b in range(2):
            k, q = alive[b, keep[b]], alive[b, prop[b]]
            s = sizes[b].clone()
            s[k] += 0.3 * w[k][:, q] @ sizes[b, q]
            new.append((s, k))
        sizes = torch.stack([s for s, _ in new])
        alive = torch.stack([k for _, k in new])
        dense = sizes.gather(1, alive)
        torch.testing.assert_close(seen[i][:, 1:, 0], dense, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(seen[1][:, 1:].sum(1), torch.full((2, 1), 64.0))  # not conserved for alpha < 1


def test_batch_invariance():
    model = make_variant("reg_no_cls")
    vk.accelerate(model, "gtp", num_prop=6)
    torch.manual_seed(3)
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[3:4]), model(batch)[3:4], atol=1e-5, rtol=0)


def test_reducing_blocks_are_eager_others_fused():
    model = make_variant("plain")
    vk.accelerate(model, "gtp", num_prop=4, blocks=(1, 2))
    assert [b.attn.fused_attn for b in model.blocks] == [True, False, False, True, True, True]
