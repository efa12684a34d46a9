"""`vitkit train` / `vitkit eval` from flags and YAML recipes (flags win), writing their results files."""
from __future__ import annotations

import json

import pytest

from vitkit.cli import main

TINY_ARGS = ["--no-pretrained", "--model-arg", "img_size=32", "--model-arg", "patch_size=4",
             "--model-arg", "embed_dim=64", "--model-arg", "num_heads=4", "--model-arg", "depth=2"]


def test_train_from_recipe_then_eval(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: digits\nsplit: train=6,val=3\nepochs: 3\nbatch_size: 32\nmethod: [linear]\n"
                      f"out: {tmp_path / 'from-recipe'}\nexport: {tmp_path / 'w.safetensors'}\n")
    code = main(["train", "vit_tiny_patch16_224", *TINY_ARGS, "--config", str(recipe), "--epochs", "1",
                 "--no-progress"])
    assert code == 0
    out = tmp_path / "from-recipe"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the flag (--epochs 1) won over the recipe (epochs: 3)
    assert json.loads(lines[0])["val_acc"] >= 0
    assert (tmp_path / "w.safetensors").is_file()
    assert "results:" in capsys.readouterr().out

    code = main(["eval", str(tmp_path / "w.safetensors"), "--model-arg", "num_heads=4", "--data", "digits",
                 "--split", "train=6,test=3", "--protocol", "finetuned", "--protocol", "knn",
                 "--out", str(tmp_path / "eval")])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert set(results) == {"finetuned", "knn"} and results["knn"]["n"] == 30
    assert "| knn |" in (tmp_path / "eval" / "eval.md").read_text()


def test_unknown_recipe_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: digits\nepochz: 3\n")
    assert main(["train", "vit_tiny_patch16_224", *TINY_ARGS, "--config", str(recipe)]) == 2
    assert "unknown option `epochz`" in capsys.readouterr().err
