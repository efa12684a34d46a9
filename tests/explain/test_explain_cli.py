"""`vitkit explain` and `vitkit segment` write an overlay PNG and the raw array (.npy)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vitkit.cli import main

from conftest import CIFAR_JPEG, SHAMAIL, require

TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-arg", "img_size=32", "--model-arg",
        "patch_size=4", "--model-arg", "depth=2", "--model-arg", "reg_tokens=4", "--num-classes", "10"]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("method", ["attention", "rollout", "gradcam"])
def test_explain_writes_png_and_npy(method, image, tmp_path, capsys):
    out = tmp_path / f"{method}.png"
    assert main(["explain", str(image), *TINY, "--method", method, "--out", str(out), "--display", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["png"] == str(out) and Image.open(out).size == (64, 64)
    assert np.load(out.with_suffix(".npy")).shape == (8, 8)


def test_segment_writes_png_and_npy(image, tmp_path, capsys):
    out = tmp_path / "seg.png"
    # the 60x40 image is resized to 48x32 and its centre 32x32 kept (the data transform): x in [10, 50) is seen
    assert main(["segment", str(image), *TINY, "--point", "49,0", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["patch"] == [0, 7]
    assert np.load(out.with_suffix(".npy")).shape == (32, 32) and out.exists()
    assert main(["segment", str(image), *TINY, "--point", "oops"]) == 2


def test_explain_real_checkpoint(tmp_path, capsys):
    img = require(CIFAR_JPEG) / "automobile" / "0017.jpg"
    out = tmp_path / "heat.png"
    args = ["explain", str(img), "--model", str(require(SHAMAIL)), "--model-arg", "num_heads=4", "--mean", "0.5",
            "--std", "0.5", "--method", "gradcam", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["target"] == 1, "shamail predicts this test image's class (automobile)"
    assert Image.open(out).size == (256, 256)
