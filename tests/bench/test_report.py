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


def test_report_tables_average_seeds_not_show_the_last():
    """A 3-seed run: the table shows the mean ± population std over seeds, and Δ finetune compares the means (it
    showed the last seed's row alone)."""
    from vitkit.bench.report import markdown, over_seeds

    rows = [dict(_row("m", chain, "t", "finetune", acc), seed=seed, key=f"{chain}{seed}")
            for chain, accs in (("baseline", (0.5, 0.6, 0.7)), ("lora", (0.9, 0.6, 0.6))) for seed, acc in
            enumerate(accs)]
    merged = {r["chain"]: r for r in over_seeds(rows)}
    assert merged["lora"]["acc"] == pytest.approx(0.7) and merged["lora"]["acc_runs"] == [0.9, 0.6, 0.6]
    assert merged["lora"]["acc_std"] == pytest.approx(np.std([0.9, 0.6, 0.6]))
    table = markdown(rows)
    assert "| m | lora | 0.700 ± 0.141 | +0.100 |" in table and "| m | baseline | 0.600 ± 0.082 | +0.000 |" in table
    assert "3 seeds" in table


def test_chain_fields_may_be_lists():
    assert parse_chain("spectrogram:img_size=[32,64],train_head=false+tome:r=2") == [
        ("spectrogram", {"img_size": [32, 64], "train_head": False}), ("tome", {"r": 2})]


def test_merging_seeds_adds_no_keys_a_row_lacks():
    from vitkit.bench.report import over_seeds

    rows = [dict(_row("m", "lora", "t", "finetune", acc), seed=seed) for seed, acc in enumerate((0.5, 0.7))]
    rows += [dict(_row("m", "tome", "t", "finetune", acc), seed=seed, acc_pre_post=0.8) for seed, acc in
             enumerate((0.6, 0.7))]
    merged = {r["chain"]: r for r in over_seeds(rows)}
    assert "acc_pre_post" not in merged["lora"] and merged["tome"]["acc_pre_post"] == pytest.approx(0.8)
