"""The command line: `vitkit info`, `vitkit methods`, clear errors with exit status 2."""
from __future__ import annotations

import json

import pytest

from vitkit import cli
from conftest import SHAMAIL, SMMK47, require


def test_info_on_a_timm_name(capsys):
    assert cli.main(["info", "vit_tiny_patch16_224", "--no-pretrained", "--json"]) == 0
    out = capsys.readouterr().out
    assert "5,717,416 total" in out and "197 (cls | 14x14 patches of 16px)" in out
    assert json.loads(out[out.index("{"):])["total_params"] == 5_717_416


def test_info_applies_methods_and_reads_files(capsys):
    assert cli.main(["info", str(require(SHAMAIL)), "--model-arg", "num_heads=4", "--model-arg", "num_classes=10",
                     "--method", "linear"]) == 0
    assert "1,290 trainable" in capsys.readouterr().out


def test_methods_lists_the_registry(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "freeze_patch_embed" in out


@pytest.mark.parametrize("argv,message", [
    (["info", str(SMMK47)], "post-norm"),
    (["info", "vit_tiny_patch16_224", "--no-pretrained", "--method", "lineer"], "did you mean `linear`"),
])
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    require(SMMK47)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("2:4", "2:4"), ("4", 4), ("0.5", 0.5),
                                         ("true", True), ("[1e-4, 2:4]", [1e-4, "2:4"]), ("1_000", 1000),
                                         ("lora", "lora"), ("null", None)])
def test_set_values_read_numbers_as_yaml_1_2(text, value):
    """PyYAML (YAML 1.1) reads `3e-4` as a string and `2:4` as 124; --set values and recipes mean 3e-4 and '2:4'."""
    assert cli.parse_value(text) == value and type(cli.parse_value(text)) is type(value)
