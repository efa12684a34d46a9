"""The bench's `robust` protocol in a tiny bench (digits images as a folder, a tiny random-init ViT): robust
accuracy beside clean accuracy, the attack in the cell key, and the figure recomputed by a plain-torch PGD on
the cell's saved model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit as vk
from vitkit.bench import bench
from vitkit.bench.recipe import RecipeError, load_recipe

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.3, 0.25)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 16 digits images as PNG files."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits") / "imgs"
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:16]):
            Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize((32, 32)).save(
                root / str(label) / f"{i}.png")
    return str(root)


def recipe(folder, **robust):
    return {"backbones": [{"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY,
                           "data": {"mean": list(MEAN), "std": list(STD)}}],
            "chains": ["bitfit"], "tasks": [{"name": "d", "root": folder, "train": 10, "eval": 6}],
            "protocols": ["finetune", "robust"], "budget": {"epochs": 5, "batch_size": 5, "full_lr": 0.003},
            "perf": False, "robust": {"eps": "8/255", "alpha": "4/255", "steps": 3, "random_start": False, **robust}}


def oracle_pgd(model, x, y, eps, alpha, steps):
    """L∞ PGD from the spec, no random start, normalisation by hand."""
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model((adv - m) / s), y, reduction="sum"), adv)
        adv = (x + (adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    with torch.no_grad():
        return model((adv - m) / s).argmax(-1), model((x - m) / s).argmax(-1)


def test_robust_cells_report_robust_beside_clean_accuracy(tmp_path, folder):
    result = bench({**recipe(folder), "chains": []}, out=tmp_path, progress=False)
    rows = {(r["chain"], r["protocol"]): r for r in result.rows}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    robust, finetune = rows[("baseline", "robust")], rows[("baseline", "finetune")]
    assert robust["clean_acc"] == pytest.approx(finetune["acc"], abs=1e-6)  # the same model, all 12 images
    assert robust["acc"] < robust["clean_acc"] and robust["n_attacked"] == 12, robust  # measured: 0.833 < 1.0
    assert robust["settings"]["robust"]["config"]["eps"] == 8 / 255
    table = (tmp_path / "results.md").read_text()
    assert "robust (clean)" in table and "ε = 0.0313725 = 8/255" in table
    assert f"| {rows[('baseline', 'robust')]['acc']:.3f} ({rows[('baseline', 'robust')]['clean_acc']:.3f}) |" in table

    # the figure, recomputed from the cell's saved model by a plain-torch PGD on the same images
    cell = rows[("baseline", "robust")]
    model = vk.load(str(tmp_path / "cells" / cell["key"] / "model")).eval()
    tf = vk.data.transform(model, mean=(0.0,) * 3, std=(1.0,) * 3)
    data = vk.data.split(vk.data.image_folder(folder), seed=None, train=10, eval=6)["eval"].with_transform(tf)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor(data.targets)
    adv_pred, clean_pred = oracle_pgd(model, x, y, 8 / 255, 4 / 255, 3)
    assert cell["acc"] == int((adv_pred == y).sum()) / len(y)
    assert cell["clean_acc"] == int((clean_pred == y).sum()) / len(y)


def test_the_attack_is_in_the_cell_key(folder):
    def keys(**robust):
        return {c.id: c.key for c in load_recipe(recipe(folder, **robust), check_backbones=False).cells()}

    base, other_eps, other_steps = keys(), keys(eps="4/255"), keys(steps=4)
    robust_id = "tiny/baseline/d/robust/s0"
    assert base[robust_id] != other_eps[robust_id] != other_steps[robust_id] != base[robust_id]
    assert base["tiny/baseline/d/finetune/s0"] == other_eps["tiny/baseline/d/finetune/s0"]
    assert keys(eps=8 / 255)[robust_id] == base[robust_id]  # 8/255 written as a fraction or a number: one cell
    assert keys(alpha="0.5/255")[robust_id] == keys(alpha=0.5 / 255)[robust_id] != base[robust_id]
    assert "tiny/bitfit/d/robust/s0" in base  # adapter chains are fine-tuned, then attacked


@pytest.mark.parametrize("robust,message", [
    ({"eps": -0.1}, "robust: pgd: `eps` must be >= 0"),
    ({"method": "pdg"}, "robust: attack: unknown method `pdg`; did you mean `pgd`"),
    ({"epsilon": 0.1}, r"robust: pgd: unknown config field\(s\) \['epsilon'\]"),
    ({"n": 0}, "robust.n: the number of evaluation images to attack must be an integer >= 1"),
])
def test_bad_robust_settings_are_a_recipe_error(folder, robust, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(json.loads(json.dumps(recipe(folder, **robust))), check_backbones=False)
