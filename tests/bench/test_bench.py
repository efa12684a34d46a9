"""vk.bench end to end on tiny random-init backbones and scikit-learn digits: determinism, resume,
failing cells as rows, outputs, and the Ray executor."""
from __future__ import annotations

import importlib.util
import json

import pytest

import vitkit as vk
from vitkit import cli
from vitkit.bench import bench, read_rows

TINY = {"pretrained": False, "img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}


def recipe(**overrides):
    base = {"backbones": [{"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}],
            "chains": ["linear"], "tasks": ["digits"], "protocols": ["knn", "finetune"],
            "budget": {"epochs": 1, "batch_size": 64}, "perf": False}
    return {**base, **overrides}


def accuracies(rows):
    return {(r["backbone"], r["chain"], r["protocol"]): r.get("acc") for r in rows if r["protocol"] != "perf"}


def test_same_seed_same_table_and_outputs(tmp_path):
    first = bench(recipe(ood=["invert"]), out=tmp_path / "a", progress=False)
    second = bench(recipe(ood=["invert"]), out=tmp_path / "b", progress=False)
    assert [r["status"] for r in first.rows] == ["ok"] * 3
    assert accuracies(first.rows) == accuracies(second.rows)
    assert {r["chain"] for r in first.rows} == {"baseline", "linear"}  # probes of adapter chains are skipped
    ft = next(r for r in first.rows if r["chain"] == "linear")
    assert ft["trainable_params"] == 64 * 10 + 10 and 0 <= ft["ood"]["invert"] <= 1
    for name in ("rows.jsonl", "results.md", "results.json", "plots/pareto_acc_throughput.png",
                 "plots/acc_vs_trainable.png"):
        assert (tmp_path / "a" / name).is_file(), name
    md = (tmp_path / "a" / "results.md").read_text()
    assert cli.main(["bench", "report", str(tmp_path / "a")]) == 0  # rebuilt from rows alone, byte-identical
    assert (tmp_path / "a" / "results.md").read_text() == md


def test_resume_recomputes_only_missing_cells(tmp_path):
    full = bench(recipe(), out=tmp_path / "full", progress=False)
    out = tmp_path / "cut"
    bench(recipe(), out=out, progress=False)
    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed while writing row 3
    resumed = bench(recipe(), out=out, progress=False)
    assert resumed.computed == [json.loads(lines[2])["key"]]
    assert accuracies(resumed.rows) == accuracies(full.rows)
    again = bench(recipe(), out=out, progress=False)
    assert again.computed == []


def test_a_failing_cell_is_a_row(tmp_path):
    result = bench(recipe(chains=["nosuchmethod", "tome:bogus=1"], protocols=["knn"]), out=tmp_path, progress=False)
    errors = {r["chain"]: r["error"] for r in result.rows if r["status"] == "error"}
    assert "unknown method `nosuchmethod`" in errors["nosuchmethod"]
    assert "unknown config field" in errors["tome:bogus=1"]
    assert any(r["status"] == "ok" for r in result.rows)
    assert "## Failed cells" in (tmp_path / "results.md").read_text()


def test_perf_cells_compare_with_the_baseline(tmp_path):
    result = bench(recipe(protocols=["finetune"], chains=["lora"], perf=True), out=tmp_path, progress=False)
    perf = next(r for r in result.rows if r["protocol"] == "perf" and r["chain"] == "baseline")
    assert next(r for r in result.rows if r["protocol"] == "perf" and r["chain"] == "lora")["status"] == "ok"
    assert perf["status"] == "ok" and perf["flops_ratio"] == 1.0
    assert perf["gmacs"] == pytest.approx(vk.info(vk.load("vit_tiny_patch16_224", **TINY)).gmacs)
    assert perf["throughput_ips"] > 0 and perf["mem_kind"] == "cpu-profiler-allocations" and perf["peak_mem_mib"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed (pip install vitkit[ray])")
def test_ray_executor_matches_serial(tmp_path):
    serial = bench(recipe(), out=tmp_path / "serial", progress=False)
    ray_run = bench(recipe(), out=tmp_path / "ray", executor="ray", progress=False)
    assert accuracies(read_rows(tmp_path / "ray" / "rows.jsonl")) == accuracies(serial.rows)
    assert len(ray_run.computed) == 3


def test_lists_build_the_recipe(tmp_path):
    backbone = {"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}
    result = vk.bench([backbone], ["tome:r=2"], ["digits"], ["knn"], out=tmp_path, progress=False)
    assert {(r["chain"], r["protocol"]) for r in result.rows} == {("baseline", "knn"), ("tome:r=2", "knn"),
                                                                   ("baseline", "perf"), ("tome:r=2", "perf")}
    assert all(r["status"] == "ok" for r in result.rows)
    perf = next(r for r in result.rows if r["chain"] == "tome:r=2" and r["protocol"] == "perf")
    assert perf["flops_ratio"] < 1  # merging tokens costs fewer FLOPs than the baseline, measured in one run
