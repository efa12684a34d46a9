"""ToMe's algorithm on plain tensors: matching, weighted merge, source composition, schedules."""
from __future__ import annotations

import pytest
import torch

from vitkit.tokens import tome_algo as algo


def test_matching_merges_the_most_similar_pairs_and_never_prefix():
    # 2 prefix tokens identical to every patch (most similar of all): they must still stay untouched
    torch.manual_seed(0)
    B, P, n = 3, 2, 10
    metric = torch.randn(B, P + n, 8)
    metric[:, 3] = metric[:, 2] * 2.0  # A token 2 duplicates B token 3 (cosine 1)
    metric[:, :P] = metric[:, 2:3]
    match = algo.bipartite_soft_matching(metric, 1, P)
    assert match.a_idx.tolist() == [2, 4, 6, 8, 10] and match.b_idx.tolist() == [3, 5, 7, 9, 11]
    assert match.a_idx[match.src[:, 0]].tolist() == [2] * B
    assert match.b_idx[match.dst[:, 0]].tolist() == [3] * B


def test_cap_is_half_of_non_prefix_tokens():
    metric = torch.randn(2, 1 + 9, 4)
    match = algo.bipartite_soft_matching(metric, 100, 1)
    assert match.r == 4  # (10 - 1) // 2
    assert algo.bipartite_soft_matching(metric, 0, 1) is None


def test_weighted_merge_formula_and_sizes():
    torch.manual_seed(1)
    B, P, N, C = 2, 1, 9, 5
    x = torch.randn(B, N, C)
    sizes = torch.randint(1, 4, (B, N, 1)).float()
    sizes[:, :P] = 1
    match = algo.bipartite_soft_matching(torch.randn(B, N, 4), 3, P)
    out, out_sizes = algo.merge_weighted(x, sizes, match)
    assert out.shape == (B, N - 3, C)
    for b in range(B):  # by hand from the match (not from new_positions): [prefix, kept A, B + its A sources]
        a_pos, b_pos = match.a_idx.tolist(), match.b_idx.tolist()
        groups = [[i] for i in range(P)] + [[a_pos[i]] for i in match.unm[b].tolist()]
        groups += [[j] + [a_pos[i] for i, d in zip(match.src[b].tolist(), match.dst[b].tolist()) if d == t]
                   for t, j in enumerate(b_pos)]
        assert len(groups) == N - 3 and sorted(sum(groups, [])) == list(range(N))
        for j, members in enumerate(groups):
            w = sizes[b, members]
            torch.testing.assert_close(out[b, j], (x[b, members] * w).sum(0) / w.sum(), atol=1e-6, rtol=1e-6)
            assert out_sizes[b, j].item() == w.sum().item()
    assert torch.equal(out[:, :P], x[:, :P])


def test_new_positions_follow_the_merge():
    torch.manual_seed(3)
    B, P, N = 2, 1, 11
    match = algo.bipartite_soft_matching(torch.randn(B, N, 4), 3, P)
    new = algo.new_positions(match, N)
    n_unm = match.unm.shape[1]
    for b in range(B):
        a_pos, b_pos = match.a_idx.tolist(), match.b_idx.tolist()
        expected = {i: i for i in range(P)}
        expected.update({a_pos[i]: P + r for r, i in enumerate(match.unm[b].tolist())})
        expected.update({j: P + n_unm + t for t, j in enumerate(b_pos)})
        expected.update({a_pos[i]: P + n_unm + d for i, d in zip(match.src[b].tolist(), match.dst[b].tolist())})
        assert new[b].tolist() == [expected[i] for i in range(N)]


def test_source_map_counts_equal_sizes_after_several_merges():
    torch.manual_seed(2)
    B, P, Np, C = 2, 3, 30, 6
    x = torch.randn(B, P + Np, C)
    sizes, source = None, None
    for r in (5, 4, 6):
        n = x.shape[1]
        match = algo.bipartite_soft_matching(x, r, P)
        x, sizes = algo.merge_weighted(x, sizes, match)
        source = algo.compose_source(source, algo.new_positions(match, n), P, Np)
    counts = torch.stack([torch.bincount(s, minlength=x.shape[1]) for s in source]).float()
    assert torch.equal(counts[:, P:], sizes[:, P:, 0])
    assert (counts[:, :P] == 0).all() and (source >= P).all()


@pytest.mark.parametrize("r,inflect,depth,expected", [
    (4, 0.0, 3, [4, 4, 4]),
    (4, -1.0, 5, [8, 6, 4, 2, 0]),
    (4, 1.0, 5, [0, 2, 4, 6, 8]),
    ((1, 2, 3), 0.0, 3, [1, 2, 3]),
])
def test_schedule(r, inflect, depth, expected):
    assert algo.schedule(depth, r, inflect) == expected


def test_token_counts_apply_the_cap():
    assert algo.token_counts(65, 1, [40, 40, 40]) == [33, 17, 9]
    assert algo.token_counts(197, 1, [13] * 12)[-1] == 197 - 13 * 12


# ---------------------------------------------------------------- edge cases (mutation-testing survivors)


def test_no_merge_below_two_candidates():
    assert algo.max_r(2, 1) == 0 and algo.max_r(1, 1) == 0 and algo.max_r(3, 1) == 1
    assert algo.bipartite_soft_matching(torch.randn(2, 2, 4), 5, 1) is None  # one patch token: nothing to merge


def test_schedule_defaults_and_short_models():
    assert algo.schedule(3, 4) == [4, 4, 4]  # default: constant
    assert algo.schedule(1, 5, -1.0) == [5]  # one block: no ramp
    assert algo.schedule(2, 4, -1.0) == [8, 0]


def test_compose_source_without_prefix_tokens():
    # no class token (P = 0): patch 0 is token 0, a valid source like any other; -1 (dropped) stays dropped
    new = torch.tensor([[2, 0, -1, 1]])
    source = algo.compose_source(None, new, 0, 4)
    assert source.tolist() == [[2, 0, -1, 1]]
    again = algo.compose_source(source, torch.tensor([[1, 0, 0]]), 0, 4)
    assert again.tolist() == [[0, 1, -1, 0]]
