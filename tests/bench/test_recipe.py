"""Recipe validation before any work (issue 12.5, 20.1, 20.6), cell kinds and Ray options (12.9), retrieval
metrics and FLOPs over real images against plain-torch oracles (12.11, 12.4), the generated RESULTS section."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit import cli
from vitkit.bench import RecipeError, load_recipe
from vitkit.bench.recipe import Resources, default_backbone_name

from conftest import CIFAR_JPEG, require

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
BACKBONE = {"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}


def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("backbones:\n  - vit_tiny_patch16_224\nchains: [lora, tome:r=2\nprotocols: [knn]\n")
    out = tmp_path / "run"
    assert cli.main(["bench", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "YAML syntax error at line" in err[0]
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("chain,message", [("lroa", "unknown method `lroa`; did you mean `lora`"),
                                           ("tome:bogus=1", "unknown config field(s) ['bogus']"),
                                           ("lora:rank=x", "`rank` must be")])
def test_bad_chain_stops_before_any_work(tmp_path, capsys, chain, message, monkeypatch):
    import yaml

    from vitkit.bench import run

    monkeypatch.setattr(run, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"backbones": [BACKBONE], "chains": [chain], "protocols": ["knn"]}))
    for extra in ([], ["--dry-run"]):
        assert cli.main(["bench", str(path), "--out", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"chains: `{chain}`" in err[0] and message in err[0] and str(path) in err[0]
    assert not (tmp_path / "run").exists()


def small_folder(root: Path, per_class: int = 6) -> str:
    import shutil

    for cls in ("airplane", "cat"):
        (root / cls).mkdir(parents=True)
        for f in sorted((require(CIFAR_JPEG) / cls).iterdir())[:per_class]:
            shutil.copy(f, root / cls / f.name)
    return str(root)


def test_chains_are_parsed_once_at_load(monkeypatch, tmp_path):
    """The runner works from the parsed cell: a second parse would fail here."""
    from vitkit.bench import bench, recipe

    task = {"name": "small", "root": small_folder(tmp_path / "imgs"), "train": 4, "eval": 2}
    loaded = load_recipe({"backbones": [BACKBONE], "chains": ["tome:r=1"], "protocols": ["knn"], "perf": False,
                          "tasks": [task]})
    monkeypatch.setattr(recipe, "parse_chain", lambda *a: pytest.fail("chain string parsed again"))
    monkeypatch.setattr(recipe, "make_chain", lambda *a: pytest.fail("chain string parsed again"), raising=False)
    assert [c.chain.steps[0][0] for c in loaded.cells() if c.chain.steps] == ["tome"]
    assert loaded.chains[0].steps[0][1].r == 1  # a typed config
    result = bench(loaded, out=tmp_path / "run", progress=False)
    assert [r["status"] for r in result.rows] == ["ok", "ok"]


def test_task_that_cannot_be_split_is_a_recipe_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / cls / f"{i}.jpg").write_bytes(b"")  # listed, never decoded
    with pytest.raises(RecipeError, match=r"train \+ eval = 800 \+ 200 = 1000 .*defaults: train 800, eval 200"
                                          r".*`train:` and `eval:` so that they sum to at most 3"):
        load_recipe({"backbones": [BACKBONE], "tasks": [{"name": "mine", "root": str(tmp_path / "imgs")}]})
    load_recipe({"backbones": [BACKBONE], "tasks": [{"name": "mine", "root": str(tmp_path / "imgs"),
                                                     "train": 2, "eval": 1}]})


@pytest.mark.parametrize("recipe,message", [
    ({"backbones": []}, "at least one backbone"),
    ({"backbones": ["x"], "protocols": ["zero-shot"]}, "unknown protocols"),
    ({"backbones": ["x"], "tasks": [{"name": "mine", "root": "/no/such/dir"}]}, "needs an image folder"),
    ({"backbones": ["x"], "ood": ["fog"]}, "unknown OOD variants"),
    ({"backbones": ["x"], "epochs": 3}, "unknown keys"),
    ({"backbones": ["x"], "budget": {"tune": {"lroa": [1e-3]}}}, "budget.tune: `lroa`"),
    ({"backbones": ["x"], "budget": {"tune": [0]}}, "must be > 0"),
    ({"backbones": ["x"], "resources": {"gpu": {"cpus": 1}}}, "unknown cell kind"),
    ({"backbones": ["no_such_timm_model"]}, "backbone `no_such_timm_model`"),
    ({"backbones": ["x", "x"]}, "repeat"),
])
def test_recipe_errors_before_any_work(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_hub_backbone_fails_once_at_validation(monkeypatch):
    import timm

    calls = []

    def offline(name, **kwargs):
        calls.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline mode)")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RecipeError, match=r"backbone `vit_small_patch16_224.augreg_in21k`.*hub is unreachable"):
        load_recipe({"backbones": ["vit_small_patch16_224.augreg_in21k"], "chains": ["lora", "bitfit", "tome"],
                     "protocols": ["linear", "knn", "finetune"]})
    assert calls == ["vit_small_patch16_224.augreg_in21k"]


def test_backbone_names_keep_their_tag():
    assert default_backbone_name("vit_small_patch16_224.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"
    assert default_backbone_name("vit_small_patch16_224.augreg_in1k") != default_backbone_name(
        "vit_small_patch16_224.augreg_in21k")
    assert default_backbone_name("ckpt/best.safetensors") == "best"
    recipe = load_recipe({"backbones": [{"source": "vit_tiny_patch16_224.augreg_in21k", "args": TINY},
                                        {"source": "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "args": TINY}],
                          "protocols": ["knn"]})
    assert [b.name for b in recipe.backbones] == ["vit_tiny_patch16_224.augreg_in21k",
                                                  "vit_tiny_patch16_224.augreg_in21k_ft_in1k"]


def test_weights_digest_of_a_file_backbone(tmp_path):
    import hashlib

    import vitkit as vk
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(vk.load("vit_tiny_patch16_224", **TINY).state_dict(), path)
    recipe = load_recipe({"backbones": [{"source": str(path), "args": {"num_heads": 2}}], "protocols": ["knn"]})
    assert recipe.backbones[0].weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_recipe({"backbones": [BACKBONE]}).backbones[0].weights_sha256 is None


def test_ray_options_come_from_the_recipe():
    from vitkit.bench.run import NODE_RESOURCE, ray_options

    recipe = load_recipe({"backbones": [BACKBONE], "chains": ["lora"], "protocols": ["knn", "finetune"],
                          "resources": {"finetune": {"cpus": 2, "gpus": 0.5}, "perf": {"cpus": 4},
                                        "max_retries": 0}})
    assert dict(recipe.resources)["perf"] == Resources(cpus=4)
    by_kind = {c.kind: c for c in recipe.cells()}
    assert set(by_kind) == {"probe", "finetune", "perf"}
    ft = ray_options(by_kind["finetune"], recipe, "cpu")
    assert ft["num_cpus"] == 2 and ft["num_gpus"] == 0.5 and ft["max_retries"] == 0
    perf = ray_options(by_kind["perf"], recipe, "cuda")
    assert perf["num_cpus"] == 4 and perf["num_gpus"] == 1 and perf["resources"] == {NODE_RESOURCE: 1.0}
    probe = ray_options(by_kind["probe"], recipe, "cpu")
    assert probe["num_cpus"] == 1 and probe["num_gpus"] == 0 and 0 < probe["resources"][NODE_RESOURCE] < 0.01


@pytest.mark.parametrize("value", [{"cpus": -1}, {"gpus": "one"}, {"cpus": True}])
def test_bad_resources_are_a_recipe_error(value):
    with pytest.raises(RecipeError, match=r"resources\.perf\.(cpus|gpus): a number >= 0"):
        load_recipe({"backbones": [BACKBONE], "chains": ["lora"], "resources": {"perf": value}})


def _map_at_r_oracle(gallery, gallery_y, query, query_y):
    """Plain numpy: rank the gallery by cosine, precision at each relevant rank within the first R."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    aps, r1, r5 = [], [], []
    for q, y in zip(query / np.linalg.norm(query, axis=1, keepdims=True), query_y):
        order = np.argsort(-(g @ q), kind="stable")
        rel = gallery_y[order] == y
        R = int((gallery_y == y).sum())
        hits, total = 0, 0.0
        for i in range(R):
            if rel[i]:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / R)
        r1.append(rel[:1].any())
        r5.append(rel[:5].any())
    return float(np.mean(aps)), float(np.mean(r1)), float(np.mean(r5))


def test_retrieval_metrics_match_a_numpy_oracle():
    from vitkit.bench.run import retrieval_scores

    rng = np.random.default_rng(0)
    gallery, query = rng.normal(size=(40, 8)), rng.normal(size=(15, 8))
    gallery_y, query_y = rng.integers(0, 4, 40), rng.integers(0, 4, 15)
    got = retrieval_scores(torch.tensor(gallery), torch.tensor(gallery_y), torch.tensor(query), torch.tensor(query_y))
    mapr, r1, r5 = _map_at_r_oracle(gallery, gallery_y, query, query_y)
    assert got["map@r"] == pytest.approx(mapr, abs=1e-6)
    assert got["recall@1"] == pytest.approx(r1) and got["recall@5"] == pytest.approx(r5)
    # by hand: gallery classes [0, 0, 1], the query of class 0 ranks them 0, 1, 0 -> AP@R(R=2) = (1 + 0) / 2
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.5]])
    out = retrieval_scores(g, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.1]]), torch.tensor([0]))
    assert out["map@r"] == pytest.approx(0.5) and out["recall@1"] == 1.0


def test_flops_over_images_is_the_mean_of_per_image_counts():
    """ATS keeps a number of tokens that depends on the image: the mean, min and max of per-image counts."""
    import vitkit as vk
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.bench.perf import flops_over

    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32, depth=4,
                    num_heads=2).eval()
    plain = flops_over(model, torch.randn(4, 3, 32, 32))
    assert not plain["input_dependent"] and plain["min"] == plain["max"] == pytest.approx(plain["mean"])
    with torch.no_grad():  # peaked attention: the sampled (unique) token count differs between images
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    vk.apply(model, "ats", blocks=(1, 2, 3), num_samples=12)
    images = torch.cat([torch.randn(3, 3, 32, 32), torch.zeros(1, 3, 32, 32)])
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    each = []
    for x in images:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x[None])
        each.append(counter.get_total_flops() / 2 / 1e9)
    got = flops_over(model, images, probe=2)
    assert len(set(each)) > 1 and got["input_dependent"]
    assert got["mean"] == pytest.approx(np.mean(each)) and got["min"] == min(each) and got["max"] == max(each)


def _rows():
    fp = {"device": "cpu", "device_name": "x86_64", "threads": 2, "torch": "2", "timm": "1", "python": "3.11"}
    base = {"fingerprint": fp, "git_commit": "abc", "seed": 0, "task": "t", "status": "ok", "started": 0.0,
            "seconds": 1.0, "n_train": 10, "n_eval": 5}
    rows = []
    for b, accs in (("emb", (0.5, 0.6, 0.7, 0.72, 0.69)), ("rnd", (0.2, 0.25, 0.3, 0.33, 0.28))):
        rows += [{**base, "key": f"{b}l", "backbone": b, "chain": "baseline", "protocol": "linear", "acc": accs[0]},
                 {**base, "key": f"{b}k", "backbone": b, "chain": "baseline", "protocol": "knn", "acc": accs[1]},
                 {**base, "key": f"{b}f", "backbone": b, "chain": "baseline", "protocol": "finetune", "acc": accs[2],
                  "lr": 1e-3, "lr_source": "tuned", "tune": {"0.001": 0.6, "0.01": 0.5},
                  "settings": {"budget": {"epochs": 2, "batch_size": 8, "grid": [0.001, 0.01], "val": 0.2}},
                  "trainable_params": 100},
                 {**base, "key": f"{b}lo", "backbone": b, "chain": "lora", "protocol": "finetune", "acc": accs[3],
                  "lr": 1e-2, "lr_source": "tuned", "tune": {"0.001": 0.4, "0.01": 0.7}, "trainable_params": 10,
                  "settings": {"budget": {"epochs": 2, "batch_size": 8, "grid": [0.001, 0.01], "val": 0.2}}},
                 {**base, "key": f"{b}to", "backbone": b, "chain": "tome", "protocol": "finetune", "acc": accs[4],
                  "acc_pre_post": accs[2], "lr": 1e-3, "trainable_params": 100,
                  "settings": {"budget": {"epochs": 2, "batch_size": 8, "grid": [0.001, 0.01], "val": 0.2}}}]
        for chain, ratio, speed in (("baseline", 1.0, 1.0), ("lora", 1.0, 0.95), ("tome", 0.62, 1.31)):
            rows.append({**base, "key": f"{b}p{chain}", "backbone": b, "chain": chain, "protocol": "perf",
                         "gmacs": 0.06 * ratio, "flops_ratio": ratio, "throughput_ips": 100 * speed, "speedup": speed,
                         "peak_mem_mib": 1.0, "batch": 8})
    rows[-1]["flops_ratio"], rows[-1]["speedup"] = 0.9, 0.8  # rnd/tome
    return rows


def test_results_section_prints_only_figures_from_rows(tmp_path):
    from vitkit.bench.report import results_section, splice_section

    text = results_section(_rows(), "runs/x")
    assert "| emb | 0.500 | 0.600 | 0.700 (lr 0.001, tuned) | lora 0.720 (10, lr 0.01, tuned) | tome 0.690 (-0.010) |" in text
    assert "Chains that cut FLOPs (tome): 10–38 % fewer FLOPs at 0.80–1.31× the baseline's images/s" in text
    assert "| emb | lora | 0.400 | 0.700 | 0.01 | 0.720 |" in text
    assert "x86_64" in text and "`abc`" in text
    doc = tmp_path / "RESULTS.md"
    doc.write_text("## Other section\n\nkept 1.23\n")
    splice_section(doc, "runs/x", _rows())
    splice_section(doc, "runs/x", _rows()[:-1])  # replaced in place, not appended twice
    out = doc.read_text()
    assert out.startswith("## Other section\n\nkept 1.23\n") and out.count("## `vitkit bench`") == 1
    assert "0.80–1.31×" not in out


def test_committed_results_section_is_generated_from_committed_rows():
    """benchmarks/RESULTS.md's bench section is exactly what its rows generate (no hand-written figures)."""
    from vitkit.bench.report import results_section
    from vitkit.bench.run import read_rows

    root = Path(__file__).resolve().parents[2]
    folder = "benchmarks/bench_cifar"
    expected = results_section(read_rows(root / folder / "rows.jsonl"), folder)
    assert expected in (root / "benchmarks" / "RESULTS.md").read_text()
    assert (root / folder / "results.md").read_text() == __import__("vitkit.bench.report", fromlist=["x"]).markdown(
        read_rows(root / folder / "rows.jsonl"))


def test_methods_table_wraps_long_defaults_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "freeze_patch_embed=" in out.replace("\n", "").replace("│", "").replace(" ", "") or "freeze" in out
