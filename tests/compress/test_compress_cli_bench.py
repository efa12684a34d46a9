"""Compression in `vitkit bench` chains (perf rows carry the report contract's size columns; a fine-tuned adapter
chain is pruned / quantised after training) and the `vitkit compress` command (table, save, one-line errors)."""
from __future__ import annotations

import functools
import json

import pytest
import torch

import vitkit as vk
from vitkit import cli
from vitkit.bench import bench

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 6 random 32x32 PNGs (the plumbing is under test, not accuracy)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cmp") / "imgs"
    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "ship"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return str(root)


def test_bench_chains_with_compression(tmp_path, folder, monkeypatch):
    from vitkit.bench import perf

    monkeypatch.setattr(perf, "compare", functools.partial(perf.compare, rounds=1, min_iters=1, min_seconds=0.0,
                                                           warmup=1))
    recipe = {"backbones": [{"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}],
              "chains": ["int8", "lora+prune:sparsity=0.5"],
              "tasks": [{"name": "small", "root": folder, "train": 4, "eval": 2}], "protocols": ["finetune"],
              "budget": {"epochs": 1, "batch_size": 4, "lr": 0.01}, "perf": True}
    result = bench(recipe, out=tmp_path, progress=False)
    rows = {(r["chain"], r["protocol"]): r for r in result.rows}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    base, pruned, int8 = (rows[(c, "perf")] for c in ("baseline", "lora+prune:sparsity=0.5", "int8"))
    targets = 2 * (3 * 32 * 32 + 32 * 32 + 2 * 128 * 32)  # qkv + proj + fc1 + fc2 weights of 2 blocks
    zeros = {r["chain"]: r["params"] - r["nonzero_params"] for r in (base, pruned)}  # (zero-initialised biases)
    assert zeros["lora+prune:sparsity=0.5"] - zeros["baseline"] == targets // 2
    assert int8["baseline_model_bytes"] - int8["model_bytes"] > 2.5 * targets  # ~3 of 4 bytes per target weight
    assert int8["flops_ratio"] == pytest.approx(1)  # the float graph's FLOPs
    from vitkit.bench.report import results_section

    assert "| model MB | sparsity |" in results_section(result.rows, tmp_path)
    tail = rows[("lora+prune:sparsity=0.5", "finetune")]  # lora trained, then merged and pruned
    assert "acc_pre_compress" in tail and "acc_pre_post" not in tail
    saved = json.loads((tmp_path / "cells" / tail["key"] / "model" / "vitkit.json").read_text())
    assert [m["name"] for m in saved["methods"]] == ["prune"]


def test_cli_compress_table_save_and_bad_value(tmp_path, capsys):
    code = cli.main(["compress", "vitkit/vit-tiny-cifar", "--method", "prune:sparsity=0.5,scope=layer", "--method",
                     "int8", "--no-speed", "--out", str(tmp_path / "m"), "--json", str(tmp_path / "row.json")])
    out = capsys.readouterr().out
    assert code == 0 and "| sparsity | 0.000 | 0.48" in out and "int8-dynamic(torch.ao)" in out
    assert "sparsity saves no time on this device" in out
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["model_bytes"] < row["baseline_model_bytes"] / 3
    assert [a.name for a in vk.applied(vk.load(tmp_path / "m"))] == ["prune", "int8"]
    code = cli.main(["compress", "vitkit/vit-tiny-cifar", "--method", "prune:pattern=2:5", "--no-speed"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pattern 2:5 needs the input width to be a multiple of M=5" in err
    with torch.no_grad():
        assert vk.load(tmp_path / "m")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
