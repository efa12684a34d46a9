"""`vitkit attack`: help, a one-liner on a bundled dataset that reproduces `vk.attack`, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import vitkit as vk
from vitkit import cli

TINY_ARGS = ["vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10", "--model-arg", "img_size=32",
             "--model-arg", "patch_size=8", "--model-arg", "embed_dim=32", "--model-arg", "depth=1",
             "--model-arg", "num_heads=2"]


def test_help_lists_every_attack_and_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attack", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--eps", "--alpha", "--steps", "--random-start", "--norm", "--target", "--backend", "{dta,fgsm,pgd", "--layer", "--probe"):
        assert flag in out, flag


def test_one_liner_writes_json_and_markdown_equal_to_the_api(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["attack", *TINY_ARGS, "--data", "digits", "--n", "6", "--mean", "0.3", "--std", "0.2", "--method", "pgd",
            "--eps", "0,2/255", "--steps", "2", "--seed", "3", "--no-progress", "--out", str(out)]
    torch.manual_seed(0)  # the command's random-init model
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "attack.json").read_text())
    md = (out / "attack.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| vit_tiny_patch16_224 | digits | 6 | pgd | linf | 0 (0/255)")
    assert "2/255" in md[3] and md[3] in printed
    assert [r["config"]["eps"] for r in summary["reports"]] == [0, 2 / 255]
    assert summary["n"] == 6 and summary["mean"] == [0.3] * 3 and summary["std"] == [0.2] * 3

    # the same attack through the API, on the images the command drew
    from vitkit.robust.commands import load_pixels

    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                    embed_dim=32, depth=1, num_heads=2, mean=0.3, std=0.2)
    images, labels, _, _ = load_pixels(model, "digits", 6, 0)
    expected = vk.attack(model, images, labels, eps=2 / 255, steps=2, seed=3).report()
    assert summary["reports"][1] == expected
    assert summary["reports"][0]["robust_accuracy"] == summary["reports"][0]["clean_accuracy"]


@pytest.mark.parametrize("extra,message", [
    (["--eps=-1/255"], "pgd: `eps` must be >= 0"),
    (["--eps", "1/0"], "expected a number or a fraction"),
    (["--steps", "2", "--method", "fgsm"], "fgsm: unknown config field(s) ['steps']"),
    (["--num-classes", "3"], "the model has 3 classes but digits has 10"),
])
def test_bad_values_are_one_line_with_status_2(tmp_path, capsys, extra, message):
    argv = ["attack", *TINY_ARGS, "--data", "digits", "--n", "2", "--no-progress", "--out", str(tmp_path), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("vitkit attack: error:"), err
    assert not (tmp_path / "attack.json").exists()


def test_a_label_free_attack_is_scored_against_the_datas_labels(tmp_path, capsys):
    """dta crafts without labels; the command still scores the model's predictions against the data's labels."""
    argv = ["attack", *TINY_ARGS, "--data", "digits", "--n", "8", "--method", "dta", "--steps", "1", "--no-progress",
            "--out", str(tmp_path)]
    torch.manual_seed(0)
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "attack.json").read_text())["reports"][0]

    from vitkit.robust.commands import load_pixels

    torch.manual_seed(0)  # the command's random-init model, scored by hand
    model = vk.load("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                    embed_dim=32, depth=1, num_heads=2).eval()
    images, labels, _, _ = load_pixels(model, "digits", 8, 0)
    with torch.no_grad():
        mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
        accuracy = (model((images - mean) / std).argmax(1) == labels).float().mean().item()
    assert report["labels_from"] == "given" and report["clean_accuracy"] == pytest.approx(accuracy)
