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
    assert "gtp" in vk.get_runner(model).owners(), "num_prop=0 must register GTP (identity through its path)"
    taps = []
    model.blocks[3].attn.attn_drop.register_forward_hook(lambda m, a, out: taps.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)
    n = model.num_prefix_tokens + 64
    assert taps == [(2, 4, n, n)], f"the eager attention of block 3 was not tapped: {taps}"


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


def _rank_by_hand(attn, p):
    """g_j = max_h A_h[j, j] * max_h sum_i A_h[i, j] over non-prefix j, from the spec, plain torch."""
    n = attn.shape[-1]
    self_attn = torch.stack([attn[:, :, j, j] for j in range(n)], -1).max(1).values  # (B, N)
    received = torch.stack([attn[:, :, :, j].sum(-1) for j in range(n)], -1).max(1).values
    return (self_attn * received)[:, p:]


def test_alpha0_without_token_scale_is_pure_pruning(images):
    model = make_variant("registers")
    with torch.no_grad():
        for block in model.blocks:  # uneven attention, so the ranking is not near-degenerate
            block.attn.qkv.weight.mul_(4.0)
    got = _capture(model, 2)
    vk.accelerate(model, "gtp", num_prop=6, alpha=0.0, token_scale=False)
    vk.get_runner(model).add("after_attn", lambda x, ctx: got.__setitem__("after", x), owner="probe", blocks=[2])
    model.blocks[2].attn.attn_drop.register_forward_hook(lambda m, a, out: got.__setitem__("attn", out))
    with torch.no_grad():
        model(images)
    p, x = 5, got["before"]
    g = _rank_by_hand(got["attn"], p)
    for b in range(2):
        dropped = set(g[b].topk(6, largest=False).indices.tolist())
        keep = [p + j for j in range(x.shape[1] - p) if j not in dropped]
        torch.testing.assert_close(got["after"][b], torch.cat([x[b, :p], x[b, keep]]), atol=0, rtol=0)


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
    cells = [(i // 8, i % 8) for i in range(64)]  # dense spatial graph over the 8x8 grid, D^-1/2 G D^-1/2
    g = torch.tensor([[float(a != b and abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1) for b in cells]
                      for a in cells])
    deg = g.sum(1)
    w = g / (deg[:, None] * deg[None, :]).sqrt()
    sizes, alive = torch.ones(2, 64), [list(range(64))] * 2  # over the original patch indices
    for i in range(2):
        g_rank = _rank_by_hand(got[i], 1)
        new_sizes, new_alive = sizes.clone(), []
        for b in range(2):
            low = set(g_rank[b].topk(7, largest=False).indices.tolist())
            k = [alive[b][j] for j in range(len(alive[b])) if j not in low]
            q = [alive[b][j] for j in sorted(low)]
            new_sizes[b, k] += 0.3 * w[k][:, q] @ sizes[b, q]
            new_alive.append(k)
        sizes, alive = new_sizes, new_alive
        dense = torch.stack([sizes[b, alive[b]] for b in range(2)])
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


def test_semantic_graph_is_cosine_whatever_the_token_norms():
    torch.manual_seed(4)
    x = torch.randn(2, 20, 8)
    scale = torch.rand(2, 20, 1) * 0.5 + 1e-3  # norms well below 1
    assert torch.equal(algo.semantic_graph(x * scale, 5), algo.semantic_graph(x, 5))


def test_semantic_graph_with_fewer_tokens_than_neighbours():
    g = algo.semantic_graph(torch.randn(1, 5, 8), 8)  # every other token is a neighbour
    assert torch.equal(g[0], 1 - torch.eye(5))
