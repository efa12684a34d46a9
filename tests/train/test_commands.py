"""`vitkit train` / `vitkit eval` from flags and YAML recipes (flags win), writing their results files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vitkit.cli import main

ROOT = Path(__file__).resolve().parents[2]

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


FULL_TINY = ["vit_tiny_patch16_224", *TINY_ARGS, "--data", "digits", "--split", "train=6", "--batch-size", "16",
             "--no-progress"]


def _one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code, err
    errors = [line for line in err if line.startswith("vitkit ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def test_nan_loss_is_one_line_naming_the_lr_and_the_last_good_checkpoint_stays(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FULL_TINY, "--method", "full", "--epochs", "1", "--lr", "1e-3", "--out", str(out)]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    code = main(["train", *FULL_TINY, "--method", "full", "--epochs", "3", "--lr", "1e6", "--out", str(out)])
    line = _one_line_error(capsys, code)
    assert "NonFiniteLossError" in line and "lr 1e+06 from --lr" in line and "--lr 100000" in line, line
    assert "earlier run's, untouched" in line, line
    assert (out / "last.pt").read_bytes() == before  # nothing already written is lost


def test_yaml_syntax_error_in_config_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("data: digits\nepochs: [3\nlr: 0.1\n")
    code = main(["train", "vit_tiny_patch16_224", *TINY_ARGS, "--config", str(recipe), "--out", str(tmp_path / "r")])
    line = _one_line_error(capsys, code)
    assert f"--config {recipe}: not valid YAML at line" in line and "fix the file" in line, line
    assert not (tmp_path / "r").exists()


def test_eval_knn_without_a_split_names_the_cli_flag(tmp_path, capsys):
    code = main(["eval", "vit_tiny_patch16_224", *TINY_ARGS, "--data", "digits", "--protocol", "knn",
                 "--out", str(tmp_path)])
    line = _one_line_error(capsys, code)
    assert "--protocol knn needs reference images" in line and "--split train=" in line, line
    assert "train=" in line and "vk.evaluate" not in line


def test_an_unexpected_exception_is_one_line_unless_debug(monkeypatch, capsys):
    import vitkit.train.commands as commands

    def boom(args):
        raise KeyError("internal")

    monkeypatch.setattr(commands, "load_data", boom)
    line = _one_line_error(capsys, main(["train", *FULL_TINY]), expected_code=1)
    assert "internal error: KeyError" in line and "--debug" in line, line
    with pytest.raises(KeyError):
        main(["--debug", "train", *FULL_TINY])
    with pytest.raises(KeyError):
        main(["train", *FULL_TINY, "--debug"])
    monkeypatch.setenv("VITKIT_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["train", *FULL_TINY])


# --- issue 20.2: a documented command must never overwrite the shipped model ---------------------------------
def _asset():
    from vitkit.models.loading import EMBEDDED

    import vitkit.assets  # noqa: F401 - registers the embedded model

    return EMBEDDED["vitkit/vit-tiny-cifar"]["file"]


def test_export_into_the_package_is_refused_before_training(tmp_path, capsys):
    asset = _asset()
    before = hashlib.sha256(asset.read_bytes()).hexdigest()
    out = tmp_path / "run"
    code = main(["train", *FULL_TINY, "--method", "linear", "--epochs", "1", "--out", str(out),
                 "--export", str(asset)])
    line = _one_line_error(capsys, code)
    assert "inside the vitkit package" in line and f"--replace-embedded {before[:12]}" in line, line
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == before and not out.exists()
    code = main(["train", *FULL_TINY, "--method", "linear", "--epochs", "1", "--out", str(out),
                 "--export", str(asset), "--replace-embedded", "00000000"])
    assert "has sha256" in _one_line_error(capsys, code)
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == before


def test_the_embedded_recipe_exports_into_its_run_folder():
    import yaml

    recipe = yaml.safe_load((ROOT / "scripts" / "embedded" / "vit-tiny-cifar.yaml").read_text())
    assert "/" not in recipe["export"], recipe["export"]  # a bare name: OUT/<name>, never vitkit/assets/


def test_bare_export_name_goes_to_the_run_folder_and_a_checked_replace_works(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", *FULL_TINY, "--method", "linear", "--epochs", "1", "--out", str(out),
                 "--export", "w.safetensors"]) == 0
    assert (out / "w.safetensors").is_file()
    import vitkit
    from vitkit.train.commands import export_target

    fake = tmp_path / "site" / "vitkit"  # a stand-in package, so the test never touches the real asset
    (fake / "assets").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    target = fake / "assets" / "model.safetensors"
    target.write_bytes(b"old weights")
    digest = hashlib.sha256(b"old weights").hexdigest()
    monkeypatch.setattr(vitkit, "__file__", str(fake / "__init__.py"))
    with pytest.raises(ValueError, match="inside the vitkit package"):
        export_target(str(target), out)
    with pytest.raises(ValueError, match="has sha256"):
        export_target(str(target), out, "deadbeef")
    assert export_target(str(target), out, digest[:8]) == target
