"""The backbone zoo in `vk.bench`: every non-ViT timm backbone (ConViT, GC ViT, TinyViT, ResNet, ConvNeXt, and
vitkit's CvT; tiny random configs) runs the probe protocols, fine-tune, OOD and the quality columns; a ViT-only
method on them is a `skipped` row naming the reason, not an error; outside the bench such a model is refused."""
from __future__ import annotations

import pytest

import vitkit as vk
from vitkit import cli
from vitkit.bench import bench

from test_bench import small_folder  # noqa: F401 - the 3-class CIFAR JPEG fixture

S32 = {"input_size": [3, 32, 32]}
ZOO = [
    {"name": "convit", "source": "convit_tiny", "args": dict(pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                                                             depth=2, num_heads=2, local_up_to_layer=1)},
    {"name": "gcvit", "source": "gcvit_xxtiny", "data": S32,
     "args": dict(pretrained=False, img_size=32, embed_dim=8, mlp_ratio=1.0, window_size=[2, 2, 1, 1])},
    {"name": "tinyvit", "source": "tiny_vit_5m_224", "data": S32,
     "args": dict(pretrained=False, embed_dims=[16, 16, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                  window_sizes=[2, 2, 2, 1])},
    {"name": "resnet", "source": "test_resnet", "args": {"pretrained": False}, "data": S32},
    {"name": "convnext", "source": "test_convnext", "args": {"pretrained": False}, "data": S32},
    {"name": "cvt", "source": "cvt_13", "data": S32,  # vitkit's CvT, registered with timm
     "args": dict(pretrained=False, embed_dims=[8, 16, 16], depths=[1, 1, 1], num_heads=[1, 2, 2])},
]
PROTOCOLS = ["linear", "knn", "finetune", "quality"]


@pytest.fixture(scope="module")
def zoo_run(small_folder, tmp_path_factory):  # noqa: F811
    recipe = {"backbones": ZOO, "chains": ["tome"], "protocols": PROTOCOLS, "ood": ["invert"], "perf": False,
              "tasks": [{"name": "small", "root": small_folder, "train": 6, "eval": 4}],
              "budget": {"epochs": 1, "batch_size": 6, "full_lr": 0.01}}
    out = tmp_path_factory.mktemp("zoo")
    return bench(recipe, out=out, progress=False), out


def test_every_non_vit_backbone_runs_the_protocols(zoo_run):
    result, _ = zoo_run
    base = {(r["backbone"], r["protocol"]): r for r in result.rows if r["chain"] == "baseline"}
    assert set(base) == {(b["name"], p) for b in ZOO for p in PROTOCOLS}
    for (name, protocol), row in base.items():
        assert row["status"] == "ok", (name, protocol, row.get("error"))
        if protocol != "quality":
            assert 0 <= row["acc"] <= 1 and 0 <= row["ood"]["invert"] <= 1, row
    assert base[("resnet", "finetune")]["trainable_params"] == base[("resnet", "finetune")]["params"] > 0

def test_quality_columns(zoo_run):
    result, out = zoo_run
    quality = {r["backbone"]: r for r in result.rows if r["protocol"] == "quality" and r["chain"] == "baseline"}
    assert quality["convit"]["locality"] > 0 and len(quality["convit"]["locality_heads"]) == 2  # ConViT: 2 blocks
    for name in ("gcvit", "tinyvit", "resnet", "convnext", "cvt"):  # no global attention map: said, not guessed
        assert quality[name]["locality"] is None and "no global attention map" in quality[name]["locality_note"]
    for row in quality.values():
        assert 0 <= row["overlap"] <= 1 and 0 <= row["overlap_auroc"] <= 1, row
    assert quality["resnet"]["overlap_features"] == "forward_intermediates 3 of 5, 4x4"  # deepest map >= 4x4
    md = (out / "results.md").read_text()
    assert "| locality | sim. overlap (AUROC) |" in md


def test_vit_only_method_is_a_skipped_row(zoo_run):
    result, out = zoo_run
    tome = [r for r in result.rows if r["chain"] == "tome"]
    assert len(tome) == len(ZOO) * len(PROTOCOLS)
    for row in tome:
        assert row["status"] == "skipped", row
        assert "not a timm VisionTransformer" in row["skipped"] and "error" not in row
    md = (out / "results.md").read_text()
    assert "## Skipped cells" in md and "## Failed cells" not in md
    assert "| convit | tome | skipped | skipped | skipped |" in md


def test_non_vit_outside_the_bench_is_refused_in_one_line(capsys):
    with pytest.raises(NotImplementedError, match="builds a ResNet, not a timm VisionTransformer.*any_model=True"):
        vk.load("test_resnet", pretrained=False)
    assert type(vk.load("test_resnet", pretrained=False, any_model=True)).__name__ == "ResNet"
    assert cli.main(["explain", "x.jpg", "--model", "test_resnet", "--no-pretrained"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a timm VisionTransformer" in err[0], err
