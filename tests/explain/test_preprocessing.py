"""vk.explain / vk.segment / `vitkit explain` see an image exactly as training and evaluation do: through
`vk.data.transform(model)` (one preprocessing source; issue 12 item 1)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit as vk
from vitkit.cli import main
from vitkit.explain.image import prepare

from conftest import CIFAR_JPEG, require


def _timm_model():
    """A tiny random timm ViT whose pretrained_cfg records statistics other than ImageNet's (augreg: 0.5)."""
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=2,
                    num_heads=4, num_classes=10)
    return model.eval()


def _cifar(n_per_class: int):
    root = require(CIFAR_JPEG)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(root / c / f"{i:04d}.jpg", k) for k, c in enumerate(classes) for i in range(n_per_class)]


def _oracle_input(image: Image.Image, mean, std, size: int) -> torch.Tensor:
    """Independent of vitkit: PIL's bicubic resize of the short side, centre crop, /255, normalise."""
    w, h = image.size
    s = size / min(w, h)
    image = image.convert("RGB").resize((max(size, int(w * s)), max(size, int(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    a = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    x = (torch.from_numpy(a).permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


@pytest.mark.parametrize("which", ["embedded", "timm"])
def test_explain_input_is_the_data_transform(which):
    model = vk.load("vitkit/vit-tiny-cifar").eval() if which == "embedded" else _timm_model()
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((45, 70, 3)) * 255).astype(np.uint8))  # not square: resize + crop
    expected = vk.data.transform(model)(image).unsqueeze(0)
    x, shown = prepare(model, image)
    assert torch.equal(x, expected)
    # the statistics are the model's recorded 0.5/0.5 (not ImageNet's), checked against a plain-PIL oracle
    assert torch.allclose(x, _oracle_input(image, (0.5,) * 3, (0.5,) * 3, 32), atol=2e-2)
    assert shown.size == (32, 32)
    assert np.array_equal(np.asarray(shown), np.asarray(
        ((expected[0] * 0.5 + 0.5) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()))
    with torch.no_grad():
        logits = model(expected)
    for method in ("rollout", "grad_rollout"):
        e = vk.explain(model, image, method=method)
        assert torch.allclose(e.logits, logits, atol=1e-5), method


def test_explain_predictions_agree_with_the_data_path_on_cifar():
    """40 CIFAR test images, the embedded model: explain's forward is the evaluation forward (7a0f76f: the
    explain path normalised with ImageNet statistics and agreed with the data path on 28 of these 40)."""
    model = vk.load("vitkit/vit-tiny-cifar").eval()
    tf = vk.data.transform(model)
    files = _cifar(4)
    explained, evaluated = [], []
    for path, _ in files:
        explained.append(int(vk.explain(model, path, method="rollout").logits.argmax()))
        with torch.no_grad():
            evaluated.append(int(model(tf(Image.open(path)).unsqueeze(0)).argmax()))
    assert explained == evaluated


def test_segment_input_and_point_follow_the_data_transform():
    model = _timm_model()
    image = np.zeros((50, 80, 3), np.uint8)  # 80x50 -> 51x32 (short side) -> columns 10..41 kept
    image[30:34, 40:44] = 255  # a white square: where the transform puts it is the oracle for the click mapping
    x = vk.data.transform(model)(Image.fromarray(image))
    ys, xs = np.nonzero(x[0].numpy() > 0.5)
    centre = (xs.mean() + 0.5, ys.mean() + 0.5)
    seg = vk.segment(model, image, point=(42, 32), threshold=0.5)
    assert seg.point == pytest.approx(centre, abs=0.6)
    assert seg.patch == (int(centre[1] // 4), int(centre[0] // 4))
    assert vk.data.map_point(vk.data.transform(model), (42, 32), (80, 50)) == pytest.approx(centre, abs=0.6)


def test_data_config_uses_the_input_size_of_a_dynamic_model():
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=32, depth=1,
                    num_heads=2, dynamic_img_size=True)
    assert tuple(vk.data.data_config(model)["input_size"]) == (3, 48, 48)
    x, _ = prepare(model, Image.new("RGB", (20, 20)))
    assert x.shape[-2:] == (48, 48)
    assert prepare(model, Image.new("RGB", (20, 20)), size=32)[0].shape[-2:] == (32, 32)


def test_cli_explain_uses_the_models_statistics(tmp_path, capsys):
    path, label = _cifar(1)[1]
    model = vk.load("vitkit/vit-tiny-cifar").eval()
    with torch.no_grad():
        predicted = int(model(vk.data.transform(model)(Image.open(path)).unsqueeze(0)).argmax())
    out = tmp_path / "heat.png"
    assert main(["explain", str(path), "--model", "vitkit/vit-tiny-cifar", "--method", "rollout", "--out",
                 str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predicted"] == predicted
