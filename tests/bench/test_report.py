"""Bench pieces that need no model: z-score ranking, OOD variants, recipe validation, chain parsing."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitkit.bench import load_recipe, parse_chain, zscores
from vitkit.bench.ood import apply_variant


def _row(backbone, chain, task, protocol, acc):
    return {"key": f"{backbone}{chain}{task}{protocol}", "backbone": backbone, "chain": chain, "task": task,
            "protocol": protocol, "acc": acc, "status": "ok"}


def test_zscores_by_hand_with_zero_std_and_an_incomplete_setting():
    rows = [_row("a", "baseline", "t1", "knn", 0.9), _row("b", "baseline", "t1", "knn", 0.5),
            _row("c", "baseline", "t1", "knn", 0.7),
            _row("a", "baseline", "t1", "linear", 0.6), _row("b", "baseline", "t1", "linear", 0.6),
            _row("c", "baseline", "t1", "linear", 0.6),
            _row("a", "baseline", "t2", "knn", 0.1)]  # only `a` has t2: incomplete, left out
    ranked, incomplete = zscores(rows)
    std = np.sqrt(((0.2 ** 2) * 2) / 3)  # population std of (0.9, 0.5, 0.7)
    expected = {"a": (0.2 / std + 0) / 2, "b": (-0.2 / std + 0) / 2, "c": 0.0}
    assert [r[0] for r in ranked] == ["a", "c", "b"]
    for backbone, _, z, n in ranked:
        assert z == pytest.approx(expected[backbone]) and n == 2
    assert incomplete == [("t2", "knn")]


def test_ood_variants_are_deterministic_and_invertible():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    twice = apply_variant(apply_variant(image, "invert", rng), "invert", rng)
    assert np.array_equal(np.asarray(twice), np.asarray(image))
    assert np.array_equal(np.asarray(apply_variant(image, "rotate0", rng)), np.asarray(image))
    a = apply_variant(image, "noise0.2", np.random.default_rng([3, 7]))
    b = apply_variant(image, "noise0.2", np.random.default_rng([3, 7]))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(image))
    assert apply_variant(image, "jpeg10", rng).size == image.size
    with pytest.raises(ValueError, match="unknown OOD variant"):
        apply_variant(image, "blur3", rng)


def test_chain_parsing():
    assert parse_chain("lora:rank=8,alpha=16+tome:r=4") == [("lora", {"rank": 8, "alpha": 16}), ("tome", {"r": 4})]
    assert parse_chain("") == []
