"""vitkit/adapt/dml_proxies_algo.py beyond test_dml_proxies.py: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- the Proxy-Anchor defaults (α = 32, δ = 0.1, mean over all
C classes) and a batch of one class with `mean_over="present"`. The oracle is the formula in python floats."""
from __future__ import annotations

import math

import pytest
import torch

from vitkit.adapt.dml_proxies_algo import proxy_anchor_loss


def formula(sim, labels, alpha, delta, divide_positives_by):
    """Proxy-Anchor: Σ_c log(1 + Σ_{x∈X_c⁺} e^{−α(s−δ)}) / divide_positives_by
    + Σ_c log(1 + Σ_{x∈X_c⁻} e^{α(s+δ)}) / C."""
    C = len(sim[0])
    pos = sum(math.log(1 + sum(math.exp(-alpha * (row[c] - delta)) for row, y in zip(sim, labels) if y == c))
              for c in range(C))
    neg = sum(math.log(1 + sum(math.exp(alpha * (row[c] + delta)) for row, y in zip(sim, labels) if y != c))
              for c in range(C))
    return pos / divide_positives_by + neg / C


def test_proxy_anchor_defaults_and_a_single_present_class():
    torch.manual_seed(0)
    sim = torch.empty(6, 4, dtype=torch.float64).uniform_(-1, 1)
    labels = torch.tensor([0, 2, 2, 0, 0, 2])  # classes 1 and 3 absent
    expected = formula(sim.tolist(), labels.tolist(), 32.0, 0.1, divide_positives_by=4)
    assert proxy_anchor_loss(sim, labels).item() == pytest.approx(expected, rel=1e-9)
    one = torch.tensor([1, 1, 1, 1, 1, 1])
    expected = formula(sim.tolist(), one.tolist(), 32.0, 0.1, divide_positives_by=1)
    got = proxy_anchor_loss(sim, one, alpha=32.0, delta=0.1, mean_over="present")
    assert got.item() == pytest.approx(expected, rel=1e-9)
