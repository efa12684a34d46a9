"""`vitkit train --method transmix`: full fine-tuning with the augmentation attached; a bad value is one line."""
from __future__ import annotations

import json

from vitkit.cli import main

TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--model-arg", "img_size=32", "--model-arg", "patch_size=4",
        "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--model-arg", "depth=1", "--data", "digits",
        "--split", "train=2,val=1", "--epochs", "1", "--batch-size", "10", "--no-progress"]


def test_train_with_transmix_trains_everything(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "transmix:prob=0.5", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "model" / "vitkit.json").read_text())
    assert [m["name"] for m in saved["methods"]] == ["full", "transmix"]  # `full` added: transmix trains nothing
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] > 0


def test_bad_augmentation_value_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "foraug:prob=2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vitkit train: error: foraug: `prob` must be in [0, 1], got 2"], err
