"""vitkit/adapt/pego_algo.py: the orthogonality regulariser with a rank below K - 1, the case mutation testing
found untested (benchmarks/RESULTS.md, "Mutation testing, stop 25"; test_pego.py's K = 3, r = 2 visits every pair
even when the loop runs over the rank). The oracle forms every ΔW_i = B_i A_i explicitly."""
from __future__ import annotations

import torch

from vitkit.adapt.pego_algo import group_apply, group_delta, orthogonality


def test_orthogonality_and_group_with_more_updates_than_the_rank():
    torch.manual_seed(0)
    K, r, o, i = 4, 1, 5, 6
    w, a, b, x = torch.randn(o, i), torch.randn(K, r, i), torch.randn(K, o, r), torch.randn(3, i)
    deltas = [b[k] @ a[k] for k in range(K)]
    expected = sum((w @ d.T).abs().sum() for d in deltas)
    expected = expected + sum((deltas[p] @ deltas[q].T).abs().sum() for p in range(K) for q in range(p + 1, K))
    torch.testing.assert_close(orthogonality(w, a, b), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(group_delta(a, b), sum(deltas))
    torch.testing.assert_close(group_apply(x, a, b), x @ sum(deltas).T, rtol=1e-5, atol=1e-5)
