"""vk.bench end to end on tiny random-init backbones and a small folder of CIFAR JPEGs (3 classes x 10
images): determinism, resume, cell keys, --force, tuning, protocols, OOM halving, the Ray executor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import vitkit as vk
from vitkit import cli
from vitkit.bench import bench, read_rows
from vitkit.bench import run as bench_run

from conftest import CIFAR_JPEG, require

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """3 classes x 10 CIFAR JPEGs: train 6, eval 4 per class."""
    root = tmp_path_factory.mktemp("small") / "imgs"
    for cls in ("airplane", "cat", "ship"):
        files = sorted((require(CIFAR_JPEG) / cls).iterdir())[:10]
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / cls / f.name)
    return str(root)


@pytest.fixture
def recipe(small_folder):
    def make(**overrides):
        base = {"backbones": [{"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}],
                "chains": ["bitfit"], "tasks": [{"name": "small", "root": small_folder, "train": 6, "eval": 4}],
                "protocols": ["knn", "finetune"], "budget": {"epochs": 1, "batch_size": 6, "lr": 0.01},
                "perf": False}
        return {**base, **overrides}
    return make


@pytest.fixture
def quick_perf(monkeypatch):
    """Perf cells time one short round (the tests check plumbing, not speed)."""
    import functools

    from vitkit.bench import perf

    monkeypatch.setattr(perf, "compare", functools.partial(perf.compare, rounds=1, min_iters=1, min_seconds=0.0,
                                                           warmup=1))


def accuracies(rows):
    return {(r["backbone"], r["chain"], r["protocol"]): r.get("acc") for r in rows if r["protocol"] != "perf"}


def test_same_seed_same_table_and_outputs(tmp_path, recipe):
    first = bench(recipe(ood=["invert"]), out=tmp_path / "a", progress=False)
    second = bench(recipe(ood=["invert"]), out=tmp_path / "b", progress=False)
    assert [r["status"] for r in first.rows] == ["ok"] * 3
    assert accuracies(first.rows) == accuracies(second.rows)
    assert {r["chain"] for r in first.rows} == {"baseline", "bitfit"}  # probes of adapter chains are skipped
    ft = next(r for r in first.rows if r["chain"] == "bitfit")
    assert 0 <= ft["ood"]["invert"] <= 1
    for name in ("rows.jsonl", "results.md", "results.json", "plots/pareto_acc_throughput.png",
                 "plots/acc_vs_trainable.png"):
        assert (tmp_path / "a" / name).is_file(), name
    md = (tmp_path / "a" / "results.md").read_text()
    assert cli.main(["bench", "report", str(tmp_path / "a")]) == 0  # rebuilt from rows alone, byte-identical
    assert (tmp_path / "a" / "results.md").read_text() == md


def test_resume_recomputes_only_missing_cells(tmp_path, recipe):
    out = tmp_path / "cut"
    full = bench(recipe(), out=out, progress=False)
    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed while writing row 3
    resumed = bench(recipe(), out=out, progress=False)
    assert resumed.computed == [json.loads(lines[2])["key"]]
    assert accuracies(resumed.rows) == accuracies(full.rows)
    assert bench(recipe(), out=out, progress=False).computed == []


def test_changed_budget_ood_or_device_is_not_reported_done(tmp_path, recipe):
    """Issue 12.2: a recipe changed to more epochs / another lr / another OOD list recomputes what it changes."""
    out = tmp_path / "run"
    bench(recipe(), out=out, progress=False)
    more = bench(recipe(budget={"epochs": 2, "batch_size": 6, "lr": 0.01}), out=out, progress=False)
    new = {r["key"]: r for r in more.rows}
    assert len(more.computed) == 2 and {new[k]["protocol"] for k in more.computed} == {"finetune"}
    assert all(new[k]["epochs"] == 2 for k in more.computed)  # probes do not depend on the budget
    lr = bench(recipe(budget={"epochs": 1, "batch_size": 6, "lr": 0.5}), out=out, progress=False)
    assert len(lr.computed) == 1  # only the adapter chain trains at `lr`; the baseline uses full_lr
    ood = bench(recipe(ood=["rotate30"]), out=out, progress=False)
    assert len(ood.computed) == 3
    from vitkit.bench import load_recipe
    cpu = {c.key for c in bench_run.cells_of(load_recipe(recipe(perf=True)), "cpu")}
    cuda = {c.key for c in bench_run.cells_of(load_recipe(recipe(perf=True)), "cuda")}
    assert not cpu & cuda  # CPU rows (perf above all) are never reused for --device cuda


def test_key_includes_weights_digest_and_perf_batch(tmp_path, recipe):
    from vitkit.bench import load_recipe

    path = tmp_path / "w.safetensors"
    model = vk.load("vit_tiny_patch16_224", **TINY)
    from safetensors.torch import save_file
    save_file(model.state_dict(), path)
    mine = {"backbones": [{"name": "mine", "source": str(path), "args": {"num_heads": 2}}], "protocols": ["knn"]}
    first = {c.key for c in load_recipe(mine).cells()}
    with torch.no_grad():
        model.head.bias.add_(1)
    save_file(model.state_dict(), path)  # same path, other weights
    assert not first & {c.key for c in load_recipe(mine).cells()}
    a = [c.key for c in load_recipe(recipe(perf=True)).cells() if c.protocol == "perf"]
    b = [c.key for c in load_recipe(recipe(perf=True, perf_batch=4)).cells() if c.protocol == "perf"]
    assert not set(a) & set(b)


def test_force_recomputes_chosen_cells_from_scratch(tmp_path, recipe, monkeypatch):
    out = tmp_path / "run"
    bench(recipe(), out=out, progress=False)
    calls = []
    real_fit = vk.fit
    monkeypatch.setattr(vk, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    again = bench(recipe(), out=out, progress=False, force=["tiny/bitfit/*"])
    assert len(again.computed) == 1 and calls and all(k["resume"] is True for k in calls)
    calls.clear()
    clean = bench(recipe(), out=out, progress=False, resume=False)  # starts clean: fit never resumes
    assert len(clean.computed) == 3 and calls and all(k["resume"] is False for k in calls)
    assert sorted(k.get("lr") is None for k in calls) == [False, True]  # lr passed only when the recipe sets one


def test_cli_force_and_dry_run(tmp_path, recipe, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe()))
    out = tmp_path / "run"
    assert cli.main(["bench", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["bench", str(path), "--out", str(out), "--dry-run", "--force", "*/knn/*"]) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert sorted(states) == ["done", "done", "todo"]


def test_tune_picks_lr_on_validation_before_the_test_split(tmp_path, recipe, monkeypatch):
    """Issue 12.10: `budget: {tune: [...]}` chooses on a validation split carved from train."""
    seen = []
    real_evaluate = vk.evaluate
    monkeypatch.setattr(bench_run, "_TASK_CACHE", {})  # holds this test's task only (other tests may fill it first)
    monkeypatch.setattr(vk, "evaluate", lambda model, data, **k: seen.append(sorted(data.indices))
                        or real_evaluate(model, data, **k))
    result = bench(recipe(chains=["bitfit"], protocols=["finetune"],
                          budget={"epochs": 1, "batch_size": 6, "tune": [1e-4, 3e-2]}), out=tmp_path, progress=False)
    train, evaluation, _ = bench_run.task_data(next(iter(bench_run._TASK_CACHE)))
    rows = {r["chain"]: r for r in result.rows}
    for row in rows.values():
        assert set(row["tune"]) == {"0.0001", "0.03"} and row["lr"] in (1e-4, 3e-2) and row["lr_source"] == "tuned"
        assert row["tune"][f"{row['lr']:g}"] == max(row["tune"].values())
        assert row["tune_n_val"] == 3 * 1 and row["tune_n_fit"] == 3 * 5  # 20 % of 6 per class, rounded
    test_idx = sorted(evaluation.indices)
    first_test = seen.index(test_idx)
    assert all(set(s) <= set(train.indices) for s in seen[:first_test])  # only validation images before
    assert seen[first_test - 1] != test_idx and len(seen) == 2 * 3  # per chain: 2 val evals, then the test


def test_no_lr_in_recipe_means_the_methods_default(tmp_path, recipe, monkeypatch):
    calls = []
    real_fit = vk.fit
    monkeypatch.setattr(vk, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    result = bench(recipe(protocols=["finetune"], budget={"epochs": 1, "batch_size": 6}), out=tmp_path,
                   progress=False)
    assert calls and all("lr" not in k for k in calls)
    assert {r["lr_source"] for r in result.rows} == {"method default"}


def test_fewshot_retrieval_and_row_provenance(tmp_path, recipe):
    """Issue 12.11: fewshot (mean ± std over draws), retrieval (Recall@K, MAP@R), provenance fields."""
    result = bench(recipe(chains=["tome:r=1"], protocols=["fewshot", "retrieval", "knn"],
                          fewshot={"shots": 2, "draws": 3}), out=tmp_path, progress=False)
    rows = {(r["chain"], r["protocol"]): r for r in result.rows}
    few = rows[("baseline", "fewshot")]
    assert len(few["acc_runs"]) == 3 and few["acc"] == pytest.approx(sum(few["acc_runs"]) / 3)
    assert few["acc_std"] == pytest.approx(torch.tensor(few["acc_runs"]).std(unbiased=False).item())
    ret = rows[("baseline", "retrieval")]["retrieval"]
    assert set(ret) == {"recall@1", "recall@5", "map@r"} and ret["recall@1"] <= ret["recall@5"]
    for row in result.rows:
        assert row["status"] == "ok" and row["git_commit"] and row["dtype"] == "float32"
        assert "weights_sha256" in row and row["weights_sha256"] is None  # random init
        assert row["baseline_acc"] == rows[("baseline", row["protocol"])]["acc"]
        assert row["delta_acc"] == pytest.approx(row["acc"] - row["baseline_acc"])
    md = (tmp_path / "results.md").read_text()
    assert "fewshot (± std)" in md and "retrieval MAP@R" in md


def test_oom_halves_the_batch_and_records_it(tmp_path, recipe, monkeypatch, quick_perf):
    from vitkit.bench import perf

    real_round = perf._time_round

    def tight(model, x, *a, **k):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_round(model, x, *a, **k)

    monkeypatch.setattr(perf, "_time_round", tight)
    real_fit = vk.fit

    def fit(*a, **k):
        if k["batch_size"] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_fit(*a, **k)

    monkeypatch.setattr(vk, "fit", fit)
    result = bench(recipe(chains=[], protocols=["finetune"], perf=True), out=tmp_path, progress=False)
    rows = {r["protocol"]: r for r in result.rows}
    assert rows["perf"]["status"] == "ok" and rows["perf"]["batch"] == 2 and rows["perf"]["oom_batches"] == [8, 4]
    ft = rows["finetune"]
    assert ft["status"] == "ok" and ft["fit_micro_batch"] == 3 and ft["fit_batch"] == 6
    assert ft["fit_oom_batches"] == [6]


def test_perf_cells_compare_with_the_baseline(tmp_path, recipe, quick_perf):
    result = bench(recipe(protocols=["knn"], chains=["ats:num_samples=6", "lora"], perf=True), out=tmp_path, progress=False)
    perf = {r["chain"]: r for r in result.rows if r["protocol"] == "perf"}
    assert all(r["status"] == "ok" for r in perf.values())
    assert perf["baseline"]["flops_ratio"] == 1.0 and not perf["baseline"]["flops_input_dependent"]
    assert perf["baseline"]["flops_images"] == 12  # all 3 x 4 evaluation images of the task
    assert perf["baseline"]["throughput_ips"] > 0 and perf["baseline"]["peak_mem_mib"] > 0
    ats = perf["ats:num_samples=6"]  # input-dependent: mean over every evaluation image, with min and max
    assert ats["gmacs_min"] <= ats["gmacs"] <= ats["gmacs_max"] and ats["flops_images"] == 12
    assert ats["flops_ratio"] < 1


def test_adapter_bytes_are_the_trained_tensors_on_a_random_backbone(tmp_path, recipe):
    """Issue 12.4: the random-init backbone's adapter column held the whole model's bytes."""
    result = bench(recipe(chains=["bitfit"], protocols=["finetune"]), out=tmp_path, progress=False)
    row = next(r for r in result.rows if r["chain"] == "bitfit")
    assert 4 * row["trainable_params"] <= row["adapter_bytes"] <= 4 * row["trainable_params"] + 8192
    assert row["saved_bytes"] > 4 * row["params"]  # vk.save must write everything for a random base


def test_ctrl_c_prints_one_line_and_keeps_rows(tmp_path, recipe, monkeypatch, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(protocols=["knn"], chains=[])))
    monkeypatch.setattr(bench_run, "run_cell", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", str(path), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the same command again to resume" in err[0] and "Traceback" not in err[0]


def test_lists_build_the_recipe(tmp_path, small_folder, quick_perf):
    backbone = {"name": "tiny", "source": "vit_tiny_patch16_224", "args": TINY}
    task = {"name": "small", "root": small_folder, "train": 6, "eval": 4}
    result = vk.bench([backbone], ["tome:r=2"], [task], ["knn"], out=tmp_path, progress=False)
    assert {(r["chain"], r["protocol"]) for r in result.rows} == {("baseline", "knn"), ("tome:r=2", "knn"),
                                                                   ("baseline", "perf"), ("tome:r=2", "perf")}
    assert all(r["status"] == "ok" for r in result.rows)
    perf = next(r for r in result.rows if r["chain"] == "tome:r=2" and r["protocol"] == "perf")
    assert perf["flops_ratio"] < 1  # merging tokens costs fewer FLOPs than the baseline, measured in one run


def _crash_on_bitfit(cell, *args, **kwargs):
    """Run in a Ray worker (pickled by value): kill the worker process on the bitfit cell."""
    import importlib
    import os

    if cell.chain.label == "bitfit":
        os._exit(3)
    return importlib.import_module("vitkit.bench.run").run_cell(cell, *args, **kwargs)


@pytest.mark.slow
def test_ray_executor_matches_serial_and_a_crashed_worker_is_a_row(tmp_path, recipe, monkeypatch):
    """Issue 12.9: local Ray (2 CPUs); one worker dies with os._exit: that cell is an error row, the others
    match the local executor, and the report is written."""
    import ray  # part of the test environment (constraints.txt): never skipped
    serial = bench(recipe(), out=tmp_path / "serial", progress=False)
    crash = _crash_on_bitfit
    crash.__module__ = "__main__"  # cloudpickle ships it by value, so the worker needs no test module
    monkeypatch.setattr(bench_run, "run_cell", crash)
    ray.init(num_cpus=2, resources={"vitkit_node": 1},  # the node resource perf cells take whole
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        result = bench(recipe(resources={"max_retries": 0}), out=tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    rows = {r["chain"] + "/" + r["protocol"]: r for r in read_rows(tmp_path / "ray" / "rows.jsonl")}
    assert rows["bitfit/finetune"]["status"] == "error" and "Worker" in rows["bitfit/finetune"]["error"]
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert accuracies(ok.values()) == {k: v for k, v in accuracies(serial.rows).items() if k[1] != "bitfit"}
    assert len(result.computed) == 3 and "## Failed cells" in (tmp_path / "ray" / "results.md").read_text()
