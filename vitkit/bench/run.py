"""`vk.bench`: run every cell of a recipe once, append one JSON row per cell, resume, and report.

The run folder holds `rows.jsonl` (one line per finished cell, written with one write + flush + fsync; a
truncated last line is ignored), `results.md`, `results.json`, `env.json`, `plots/*.png` and `cells/<key>/`
(fit checkpoints and saved adapters). A cell whose key already has an `ok` row is never recomputed; a failing
cell becomes an `error` row and the run goes on. `executor="ray"` runs cells as Ray tasks (the driver stays
the only writer of `rows.jsonl`). Hand-written: no library runs backbone x method x protocol grids with
these outputs (see bench.md "Why").
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from vitkit.io import atomic_write

from . import report
from .recipe import Cell, Recipe, Task, check_chain, has_adapter, load_recipe, parse_chain

_log = logging.getLogger("vitkit")


# ---------------------------------------------------------------------------------------------- rows file
def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of `rows.jsonl`; a truncated line (a run killed mid-write) is ignored, and with `repair` removed
    from the file (atomically) so that new rows append after whole lines only."""
    rows, broken = [], False
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                broken = True
                _log.warning("%s: ignoring a truncated line", path)
    if broken and repair:
        text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def fingerprint(device: str) -> dict:
    import timm

    import vitkit

    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "vitkit": vitkit.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- data
_TASK_CACHE: dict[Task, tuple] = {}
_FEATURE_CACHE: dict[str, tuple] = {}


def task_data(task: Task):
    """(train, eval, split_sha256) of a task, untransformed; cached per process."""
    import vitkit as vk

    if task not in _TASK_CACHE:
        if task.name == "digits":
            parts = vk.data.split(vk.data.digits(), seed=0, train=0.8, eval=0.2)
        else:  # per class, in file order: the first `train` images train, the last `eval` images evaluate
            folder = vk.data.image_folder(task.root, preload=True)
            by_class: dict[int, list[int]] = {}
            for index, label in enumerate(folder.targets):
                by_class.setdefault(label, []).append(index)
            short = [folder.classes[c] for c, idx in by_class.items() if len(idx) < task.train + task.eval]
            if short:
                raise ValueError(f"task `{task.name}`: classes {short[:5]} have fewer than train + eval = "
                                 f"{task.train + task.eval} images")
            parts = {"train": vk.data.Subset(folder, [i for idx in by_class.values() for i in idx[:task.train]]),
                     "eval": vk.data.Subset(folder, [i for idx in by_class.values() for i in idx[-task.eval:]])}
        digest = hashlib.sha256(json.dumps({k: v.indices for k, v in parts.items()}).encode()).hexdigest()[:16]
        _TASK_CACHE[task] = (parts["train"], parts["eval"], digest)
    return _TASK_CACHE[task]


# ---------------------------------------------------------------------------------------------- one cell
def build(cell: Cell, num_classes: Optional[int] = None):
    """The cell's backbone with its chain applied (seeded, so random-init backbones are reproducible)."""
    import vitkit as vk

    torch.manual_seed(cell.seed)
    model = vk.load(cell.backbone.source, num_classes=num_classes, **cell.backbone.args)
    if cell.protocol == "finetune" and not has_adapter(cell.chain):
        vk.adapt(model, "full")  # a chain without adapters is fine-tuned end to end
    for name, config in parse_chain(cell.chain):
        vk.apply(model, name, **config)
    return model


def run_cell(cell: Cell, recipe: Recipe, out: Path, device: str = "cpu") -> dict:
    """Compute one cell and return its row (never raises: errors become `status: error` rows)."""
    started = time.time()
    row = {"key": cell.key, "backbone": cell.backbone.name, "chain": cell.chain or "baseline",
           "task": cell.task.name, "protocol": cell.protocol, "seed": cell.seed, "started": started,
           "fingerprint": fingerprint(device)}
    try:
        problem = check_chain(cell.chain)
        if problem:
            raise ValueError(problem)
        row.update(_perf_cell(cell, recipe, device) if cell.protocol == "perf" else
                   _accuracy_cell(cell, recipe, out / "cells", device))
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failing cell is a row, not a crash
        row.update(status="error", error=f"{type(err).__name__}: {err}")
        _log.warning("cell %s failed: %s", cell.label(), row["error"])
    row["seconds"] = time.time() - started
    return row


def _perf_cell(cell: Cell, recipe: Recipe, device: str) -> dict:
    import vitkit as vk

    from .perf import compare

    model = build(cell)
    baseline = build(Cell(cell.backbone, "", cell.task, cell.protocol, cell.seed))
    info = vk.info(model)
    return {"params": info.total_params, **compare(baseline, model, batch=recipe.perf_batch, device=device)}


def _fit(cell: Cell, recipe: Recipe, cells_dir: Path, num_classes: int, device: str):
    """Build and fine-tune the model of a `finetune` cell (resuming from, or reusing, its checkpoints)."""
    import vitkit as vk

    model = build(cell, num_classes=num_classes).to(device)
    transform = vk.data.transform(model, **cell.backbone.data)
    train = task_data(cell.task)[0].with_transform(transform)
    budget = recipe.budget
    lr = budget.lr if has_adapter(cell.chain) else budget.full_lr
    result = vk.fit(model, train, epochs=budget.epochs, lr=lr, batch_size=budget.batch_size, seed=cell.seed,
                    out_dir=cells_dir / cell.key / "fit", resume=True, progress=False, save_model=False)
    step_s = sum(h["epoch_time_s"] for h in result.history) / max(1, result.history[-1]["step"])
    return model, transform, {"lr": lr, "train_step_s": step_s}


def _accuracy_cell(cell: Cell, recipe: Recipe, cells_dir: Path, device: str) -> dict:
    """Accuracy of one cell. `finetune` trains the chain's adapters (or the whole model when the chain has
    none); a chain of accelerate/compress methods only is applied *after* fine-tuning, without retraining
    (bench.md `post`), to the baseline's fine-tuned model, which is trained once and reused."""
    import vitkit as vk

    train, evaluation, split_sha = task_data(cell.task)
    row = {"split_sha256": split_sha, "n_train": len(train), "n_eval": len(evaluation)}
    if cell.protocol == "finetune":
        post = bool(cell.chain) and not has_adapter(cell.chain)
        fit_cell = Cell(cell.backbone, "", cell.task, cell.protocol, cell.seed) if post else cell
        model, transform, fit_info = _fit(fit_cell, recipe, cells_dir, len(train.classes), device)
        row.update(fit_info)
        eval_t = evaluation.with_transform(transform)
        if post:
            row["acc_pre_post"] = vk.evaluate(model, eval_t, protocol="finetuned")["top1"]
            for name, config in parse_chain(cell.chain):
                vk.apply(model, name, **config)
        saved = vk.save(model, cells_dir / cell.key / "model")
        info = vk.info(model)
        row.update(trainable_params=info.trainable_params, trainable_frac=info.trainable_fraction,
                   adapter_bytes=0 if post else (saved / "weights.safetensors").stat().st_size)

        def evaluate(data=None):  # None: the clean evaluation split
            return vk.evaluate(model, eval_t if data is None else data, protocol="finetuned")["top1"]
    else:
        from vitkit.train.evaluate import features, knn_scores, linear_probe_scores, scores_report

        model = build(cell, num_classes=len(train.classes)).to(device).requires_grad_(False)
        info = vk.info(model)
        transform = vk.data.transform(model, **cell.backbone.data)
        # linear and k-NN cells of one (backbone, chain, task, seed) share their frozen features
        shared = Cell(cell.backbone, cell.chain, cell.task, "features", cell.seed).key
        if shared not in _FEATURE_CACHE:
            _FEATURE_CACHE.clear()  # one entry: cells of a (backbone, chain) run one after another
            _FEATURE_CACHE[shared] = (features(model, train.with_transform(transform)),
                                      features(model, evaluation.with_transform(transform)))
        (train_f, train_y), clean = _FEATURE_CACHE[shared]
        score = knn_scores if cell.protocol == "knn" else linear_probe_scores
        classes = len(train.classes)

        def evaluate(data=None):  # None: the clean evaluation split
            test_f, labels = clean if data is None else features(model, data)
            return scores_report(score(train_f, train_y, test_f, classes), labels, classes)["top1"]


    row["params"] = info.total_params
    row["acc"] = evaluate()
    if recipe.ood:
        from .ood import OODDataset

        row["ood"] = {v: evaluate(OODDataset(evaluation, v, seed=cell.seed).with_transform(transform))
                      for v in recipe.ood}
        row["ood_mean"] = sum(row["ood"].values()) / len(row["ood"])
    return row


# ---------------------------------------------------------------------------------------------- the run
class BenchResult:
    """Rows of a finished run, plus what this call computed (for resume checks)."""

    def __init__(self, out: Path, rows: list[dict], computed: list[str]):
        self.out, self.rows, self.computed = out, rows, computed

    def table(self) -> str:
        return (self.out / "results.md").read_text()


def cells_of(recipe: Recipe) -> list[Cell]:
    cells = recipe.cells()
    if recipe.perf:
        seen = set()
        for cell in list(cells):
            if (cell.backbone.name, cell.chain) not in seen:
                seen.add((cell.backbone.name, cell.chain))
                cells.append(Cell(cell.backbone, cell.chain, Task("perf"), "perf", 0))
    return cells


def bench(recipe: Recipe | dict | str | os.PathLike | list, methods=(), data=("digits",), protocols=None, *,
          out: str | os.PathLike = "runs/bench", executor: str = "local", ray_address: Optional[str] = None,
          device: str = "cpu", resume: bool = True, retry_failed: bool = False, progress: bool = True,
          on_row: Optional[Callable[[dict], None]] = None) -> BenchResult:
    """Run a recipe (a `Recipe`, a dict, or a YAML path) and return the rows of the whole run folder.

    `vk.bench(["vit_tiny_patch16_224", "my.pth"], ["lora", "tome:r=4"], ["digits", {"name": "mine",
    "root": "imgs/", "train": 50, "eval": 20}], out="runs/x")` builds the recipe from lists: backbones, method
    chains and tasks (see `load_recipe` for entries). See the module docstring for the run folder.
    """
    if isinstance(recipe, (list, tuple)):
        recipe = {"backbones": list(recipe), "chains": list(methods) if not isinstance(methods, str) else methods,
                  "tasks": list(data), **({"protocols": list(protocols)} if protocols else {})}
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    if not resume and rows_path.exists():
        rows_path.unlink()
    done = {r["key"] for r in read_rows(rows_path, repair=True) if r["status"] == "ok" or not retry_failed}
    todo = [c for c in cells_of(recipe) if c.key not in done]
    (out / "env.json").write_text(json.dumps(fingerprint(device), indent=2))
    computed: list[str] = []

    def record(row: dict) -> None:
        append_row(rows_path, row)
        computed.append(row["key"])
        if on_row is not None:
            on_row(row)

    if executor == "local":
        _run_local(todo, recipe, out, device, record, progress)
    elif executor == "ray":
        _run_ray(todo, recipe, out, device, record, ray_address)
    else:
        raise ValueError(f"unknown executor `{executor}`; use 'local' or 'ray'")
    rows = read_rows(rows_path)
    report.write(out, rows)
    return BenchResult(out, rows, computed)


def _run_local(todo, recipe, out, device, record, progress) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not progress) as bar:
        task = bar.add_task("", total=len(todo))
        for cell in todo:
            bar.update(task, description=cell.label())
            record(run_cell(cell, recipe, out, device))
            bar.advance(task)


def _run_ray(todo, recipe, out, device, record, address) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install \"vitkit[ray]\"") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    remote = ray.remote(num_cpus=1, max_retries=1)(run_cell)
    pending = [remote.remote(cell, recipe, out.resolve(), device) for cell in todo]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            record(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


def dry_run(recipe: Recipe, out: Path) -> list[tuple[Cell, bool]]:
    """Every cell of the recipe and whether it is already finished."""
    done = {r["key"] for r in read_rows(Path(out) / "rows.jsonl") if r["status"] == "ok"}
    return [(c, c.key in done) for c in cells_of(recipe)]

