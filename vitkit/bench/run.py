"""`vk.bench`: run every cell of a recipe once, append one JSON row per cell, resume, and report.

The run folder holds `rows.jsonl` (one line per finished cell, written with one write + flush + fsync; a
truncated last line is ignored), `results.md`, `results.json`, `env.json`, `plots/*.png` and `cells/<key>/`
(fit checkpoints and saved adapters). The cell key hashes everything that changes a result (backbone and its
weights' SHA-256, the chain's full configs, task, protocol, seed, budget, OOD list, protocol options, perf
batch, device), so a cell whose key already has an `ok` row is never recomputed and a changed recipe
recomputes what it changes; `force=` globs recompute chosen cells from scratch. A failing cell becomes an
`error` row and the run goes on. `executor="ray"` runs cells as Ray tasks (the driver stays the only writer
of `rows.jsonl`; resources per cell kind from the recipe; perf cells hold their node alone). Hand-written: no
library runs backbone x method x protocol grids with these outputs (see bench.md "Why").
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from timm.models.vision_transformer import VisionTransformer

from vitkit.io import atomic_write

from . import report
from .recipe import BASELINE, TRAINED, Cell, Recipe, Task, load_recipe

_log = logging.getLogger("vitkit")
NODE_RESOURCE = "vitkit_node"  # one per Ray node; a perf cell takes all of it, every other cell a sliver


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

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda unavailable"
    else:
        name = platform.processor() or platform.machine()
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "vitkit": vitkit.__version__, "python": platform.python_version()}


def git_commit() -> Optional[str]:
    """The vitkit checkout's commit (with `+dirty` when it has uncommitted changes), None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


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
            folder = (vk.data.procedural(task.name, task.train + task.eval) if task.procedural else
                      vk.data.image_folder(task.root, preload=True))
            by_class: dict[int, list[int]] = {}
            for index, label in enumerate(folder.targets):
                by_class.setdefault(label, []).append(index)
            short = [folder.classes[c] for c, idx in by_class.items() if len(idx) < task.train + task.eval]
            if short:  # validated at recipe load; kept for a folder changed since
                raise ValueError(f"task `{task.name}`: classes {short[:5]} have fewer than train + eval = "
                                 f"{task.train + task.eval} images; set the task's `train:` and `eval:`")
            parts = {"train": vk.data.Subset(folder, [i for idx in by_class.values() for i in idx[:task.train]]),
                     "eval": vk.data.Subset(folder, [i for idx in by_class.values() for i in idx[-task.eval:]])}
        digest = hashlib.sha256(json.dumps({k: v.indices for k, v in parts.items()}).encode()).hexdigest()[:16]
        _TASK_CACHE[task] = (parts["train"], parts["eval"], digest)
    return _TASK_CACHE[task]


def carve_val(train, fraction: float):
    """(train minus val, val): the last `fraction` of each class's train images, in order (at least one
    image each side per class). Used to tune before the evaluation split is touched."""
    import vitkit as vk

    by_class: dict[int, list[int]] = {}
    for index, label in zip(train.indices, train.targets):
        by_class.setdefault(label, []).append(index)
    fit_idx, val_idx = [], []
    for idx in by_class.values():
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        fit_idx += idx[:len(idx) - n_val]
        val_idx += idx[len(idx) - n_val:]
    return vk.data.Subset(train.dataset, fit_idx), vk.data.Subset(train.dataset, val_idx)


# ---------------------------------------------------------------------------------------------- OOM
def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def halving_on_oom(fn: Callable[[int], dict], batch: int, what: str) -> tuple[dict, int, list[int]]:
    """`fn(batch)`, halving `batch` after each out-of-memory error; (result, batch used, batches that OOMed)."""
    failed = []
    while True:
        try:
            return fn(batch), batch, failed
        except Exception as err:  # noqa: BLE001 - only OOM is retried
            if not is_oom(err) or batch <= 1:
                raise
            failed.append(batch)
            _log.warning("%s: out of memory at batch %d, retrying at %d", what, batch, batch // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2


# ---------------------------------------------------------------------------------------------- one cell
def build(cell: Cell, num_classes: Optional[int] = None, *, post: bool = True):
    """The cell's backbone with its chain applied (seeded, so random-init backbones are reproducible).
    `post=False` leaves out the methods of a chain without adapters (applied after fine-tuning)."""
    import vitkit as vk

    torch.manual_seed(cell.seed)
    model = vk.load(cell.backbone.source, num_classes=num_classes, any_model=True, **cell.backbone.args)
    if cell.protocol in TRAINED and not cell.chain.adapter:
        vk.adapt(model, "full")  # a chain without adapters is fine-tuned end to end
    if post or cell.chain.adapter:  # a fine-tuned adapter chain gets its trailing compress steps after training
        apply_chain(cell.chain if post else cell.chain.trained, model, cell)
    return model


class SkippedCell(Exception):
    """A chain method that needs a `VisionTransformer` on another timm backbone: a `skipped` row, not an error."""


def apply_chain(chain, model, cell: Cell):
    """`chain.apply(model)`; a method refusing a backbone that is not a `VisionTransformer` skips the cell."""
    try:
        return chain.apply(model)
    except NotImplementedError as err:
        if isinstance(model, VisionTransformer):
            raise
        raise SkippedCell(f"{cell.backbone.name} is a {type(model).__name__}, not a timm VisionTransformer: "
                          f"{err}") from None


def _dtype(model, device: str) -> str:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    quantised = any("quantized" in type(m).__module__ for m in model.modules())
    return ("int8-dynamic+" if quantised else "") + "/".join(dtypes)


def error_row(cell: Cell, message: str, device: str = "cpu") -> dict:
    return {"key": cell.key, "id": cell.id, "backbone": cell.backbone.name, "chain": cell.chain.label,
            "task": cell.task.name, "protocol": cell.protocol, "seed": cell.seed, "started": time.time(),
            "weights_sha256": cell.backbone.weights_sha256, "status": "error", "error": message, "seconds": 0.0,
            "device": device}


def run_cell(cell: Cell, recipe: Recipe, out: Path, device: str = "cpu", resume: bool = True) -> dict:
    """Compute one cell and return its row (never raises: errors become `status: error` rows)."""
    started = time.time()
    row = {"key": cell.key, "id": cell.id, "backbone": cell.backbone.name, "chain": cell.chain.label,
           "task": cell.task.name, "protocol": cell.protocol, "seed": cell.seed, "started": started,
           "device": device, "fingerprint": fingerprint(device), "weights_sha256": cell.backbone.weights_sha256,
           "settings": json.loads(cell.settings)}
    try:
        row.update(_perf_cell(cell, recipe, device) if cell.protocol == "perf" else
                   _accuracy_cell(cell, recipe, out / "cells", device, resume))
        row["status"] = "ok"
    except SkippedCell as why:
        row.update(status="skipped", skipped=str(why))
    except Exception as err:  # noqa: BLE001 - a failing cell is a row, not a crash
        row.update(status="error", error=f"{type(err).__name__}: {err}")
        _log.warning("cell %s failed: %s", cell.label(), row["error"])
    row["seconds"] = time.time() - started
    return row


def _perf_cell(cell: Cell, recipe: Recipe, device: str) -> dict:
    import vitkit as vk
    from vitkit.compress._report import size_report

    from .perf import compare, flops_over

    model = build(cell)
    baseline = build(cell.with_chain(BASELINE))
    images = _flop_images(cell, model)
    size = tuple(images.shape[1:])  # the task's input size (a non-ViT backbone has no patch grid to read it from)
    base_images = _flop_images(cell.with_chain(BASELINE), baseline)
    no_view = base_images is None
    if no_view:  # point clouds: the RGB baseline is costed on blank images of its own input size
        base_images = torch.zeros(1, *vk.data.data_config(baseline, **cell.backbone.data)["input_size"])
    result, batch, failed = halving_on_oom(lambda b: compare(baseline, model, batch=b, device=device, input_size=size,
                                                             baseline_input_size=tuple(base_images.shape[1:])),
                                           recipe.perf_batch, f"perf {cell.label()}")
    if no_view:
        result["baseline_input"] = "blank images (the task has no RGB view)"
    flops = flops_over(model, images)
    base_flops = flops_over(baseline, base_images)
    result.update(gmacs=flops["mean"], gflops=2 * flops["mean"], gmacs_min=flops["min"], gmacs_max=flops["max"],
                  flops_images=flops["n"], flops_input_dependent=flops["input_dependent"],
                  flops_ratio=flops["mean"] / base_flops["mean"], baseline_gmacs=base_flops["mean"])
    size = size_report(model)  # report contract: non-zeros, real sparsity, bytes (int8 at real size)
    return {"params": size["params"], **result, "batch": batch, "oom_batches": failed,
            "dtype": _dtype(model, device), "flops_task": cell.task.name, "nonzero_params": size["nonzero_params"],
            "sparsity": size["sparsity"], "model_bytes": size["model_bytes"],
            "baseline_model_bytes": size_report(baseline)["model_bytes"]}


def _flop_images(cell: Cell, model, n: int = 256) -> Optional[torch.Tensor]:
    """The first `n` evaluation samples of the perf cell's task, through the model's transform (FLOPs of
    input-dependent token methods are averaged over them, with the minimum and maximum); None when the cell's
    chain does not run on the task (the RGB baseline of point clouds)."""
    if not cell.chain.runs_on(cell.task):
        return None
    evaluation = task_data(cell.task)[1]
    data = evaluation.with_transform(cell_transform(cell, model))
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


class TensorInput:
    """A procedural task's sample as `model` takes it: the RGB view when the chain has no input adapter (see
    `Chain.runs_on`), then the last two (spatial) dimensions resized (bilinear) to the model's input size. The
    samples are standardised when generated, so nothing is normalised here."""

    def __init__(self, view, size: Optional[tuple[int, int]]):
        self.view, self.size = view, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.view is not None:
            x = self.view(x)
        if self.size is None or tuple(x.shape[-2:]) == self.size:
            return x
        flat = x.reshape(1, -1, *x.shape[-2:])
        out = torch.nn.functional.interpolate(flat, size=self.size, mode="bilinear", align_corners=False)
        return out.reshape(*x.shape[:-2], *self.size)


def cell_transform(cell: Cell, model):
    """The transform of the cell's task for `model`: the model's image transform, or `TensorInput`."""
    import vitkit as vk

    task = cell.task.procedural
    if task is None:
        return vk.data.transform(model, **cell.backbone.data)
    if cell.chain.takes:  # the input adapter's embedding states its input: a blank sample of its size
        embed = model.patch_embed
        size = tuple(embed.example_input(1).shape[-2:]) if hasattr(embed, "example_input") else \
            tuple(vk.data.data_config(model)["input_size"][1:])
        return TensorInput(None, size if task.spatial else None)
    return TensorInput(task.view, tuple(vk.data.data_config(model, **cell.backbone.data)["input_size"][1:]))


def _fit_once(model, train, lr, budget, seed, out_dir: Path, resume: bool) -> tuple[dict, dict]:
    """`vk.fit` on the budget, halving the micro-batch (and doubling accumulation) on OOM; `lr` None uses the
    method's default (passed only when set, so both the float-only and the optional-lr `vk.fit` work)."""
    import vitkit as vk

    if not resume and out_dir.exists():
        shutil.rmtree(out_dir)

    def go(micro: int):
        kwargs = {} if lr is None else {"lr": lr}
        accum = max(1, budget.batch_size // micro)
        return vk.fit(model, train, epochs=budget.epochs, batch_size=micro, grad_accum=accum, seed=seed,
                      out_dir=out_dir, resume=resume, progress=False, save_model=False, **kwargs)

    result, micro, failed = halving_on_oom(go, budget.batch_size, f"fit {out_dir}")
    step_s = sum(h["epoch_time_s"] for h in result.history) / max(1, result.history[-1]["step"])
    info = {"train_step_s": step_s, "fit_batch": budget.batch_size, "fit_micro_batch": micro}
    if failed:
        info["fit_oom_batches"] = failed
    return result, info


def _fit(cell: Cell, recipe: Recipe, cells_dir: Path, num_classes: int, device: str, resume: bool):
    """Build and fine-tune the model of a `finetune` cell (resuming from, or reusing, its checkpoints). With
    `budget.tune`, every grid value trains on train minus a validation split and is scored on it; the best
    is retrained on all of train. The evaluation split is never read here."""
    import vitkit as vk

    budget = recipe.budget
    train = task_data(cell.task)[0]
    lr, info = budget.lr_for(cell.chain), {}
    grid = budget.grid_for(cell.chain)
    if grid:
        fit_part, val_part = carve_val(train, budget.val)
        scores = {}
        for value in grid:
            model = build(cell, num_classes=num_classes, post=False).to(device)
            transform = cell_transform(cell, model)
            _fit_once(model, fit_part.with_transform(transform), value, budget, cell.seed,
                      cells_dir / cell.key / f"tune-lr{value:g}", resume)
            scores[value] = vk.evaluate(model, val_part.with_transform(transform), protocol="finetuned")["top1"]
        lr = max(grid, key=lambda v: (scores[v], -grid.index(v)))  # ties: the first listed
        info.update(tune={f"{v:g}": s for v, s in scores.items()}, tune_n_fit=len(fit_part), tune_n_val=len(val_part))
    model = build(cell, num_classes=num_classes, post=False).to(device)
    transform = cell_transform(cell, model)
    _, fit_info = _fit_once(model, train.with_transform(transform), lr, budget, cell.seed,
                            cells_dir / cell.key / "fit", resume)
    info.update(fit_info, lr=lr, lr_source="tuned" if grid else "recipe" if lr is not None else "method default",
                epochs=budget.epochs)
    return model, transform, info


def _features(model, data, cell: Cell):
    from vitkit.train.evaluate import features

    out, _, _ = halving_on_oom(lambda b: features(model, data, batch_size=b), 256, f"features {cell.label()}")
    return out


def retrieval_scores(gallery_f: torch.Tensor, gallery_y: torch.Tensor, query_f: torch.Tensor,
                     query_y: torch.Tensor, ks=(1, 5), exclude_self: bool = False) -> dict:
    """Recall@K (a same-class item among the K most cosine-similar gallery items) and MAP@R (R = the
    gallery items of the query's class; mean over queries of (1/R) sum_{i<=R} precision@i * relevant_i).
    `exclude_self`: the queries are the gallery (leave-one-out): query i never retrieves item i."""
    g = torch.nn.functional.normalize(gallery_f.float(), dim=1)
    q = torch.nn.functional.normalize(query_f.float(), dim=1)
    sim = q @ g.T
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    order = sim.argsort(dim=1, descending=True)[:, :sim.shape[1] - int(exclude_self)]  # self ranks last: dropped
    relevant = (gallery_y[order] == query_y[:, None]).float()  # (Q, G), by rank
    out = {f"recall@{k}": float(relevant[:, :k].amax(1).mean()) for k in ks}
    r = (gallery_y[None, :] == query_y[:, None]).sum(1) - int(exclude_self)  # (Q,)
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
    precision = relevant.cumsum(1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (precision * relevant * within).sum(1) / r.clamp(min=1)
    out["map@r"] = float(ap[r > 0].mean())
    return out


def _accuracy_cell(cell: Cell, recipe: Recipe, cells_dir: Path, device: str, resume: bool = True) -> dict:
    """Accuracy of one cell. `finetune` trains the chain's adapters (or the whole model when the chain has
    none); a chain of accelerate/compress methods only is applied *after* fine-tuning, without retraining
    (bench.md `post`), to the baseline's fine-tuned model, which is trained once and reused."""
    import vitkit as vk

    train, evaluation, split_sha = task_data(cell.task)
    row = {"split_sha256": split_sha, "n_train": len(train), "n_eval": len(evaluation)}
    if cell.task.procedural:
        row.update(task_input=cell.task.procedural.input, task_view=cell.task.procedural.view_text)
    classes = len(train.classes)
    if cell.protocol in TRAINED:
        post = bool(cell.chain.steps) and not cell.chain.adapter
        fit_cell = cell.with_chain(BASELINE) if post else cell
        model, transform, fit_info = _fit(fit_cell, recipe, cells_dir, classes, device, resume or post)
        row.update(fit_info)
        eval_t = evaluation.with_transform(transform)
        if post:
            row["acc_pre_post"] = vk.evaluate(model, eval_t, protocol="finetuned")["top1"]
            apply_chain(cell.chain, model, cell)
        elif cell.chain.compress_tail.steps:  # the trained adapter chain, then pruned / quantised
            row["acc_pre_compress"] = vk.evaluate(model, eval_t, protocol="finetuned")["top1"]
            apply_chain(cell.chain.compress_tail, model, cell)
        saved = vk.save(model, cells_dir / cell.key / "model")
        info = param_counts(model)
        row.update(trainable_params=info.trainable_params, trainable_frac=info.trainable_fraction,
                   adapter_bytes=0 if post else trained_bytes(model),
                   saved_bytes=(saved / "weights.safetensors").stat().st_size)

        def evaluate(data=None):  # None: the clean evaluation split
            return vk.evaluate(model, eval_t if data is None else data, protocol="finetuned")["top1"]
    else:
        from vitkit.train.evaluate import fewshot_scores, knn_scores, linear_probe_scores, scores_report

        model = build(cell, num_classes=classes).to(device).requires_grad_(False)
        info = param_counts(model)
        if cell.protocol == "quality":
            from .quality import quality

            images = [evaluation[i][0] for i in range(len(evaluation))]
            row.update(quality(model, images, cell.backbone.data, cell.seed), params=info.total_params,
                       dtype=_dtype(model, device))
            return row
        transform = cell_transform(cell, model)
        # probe cells of one (backbone, chain, task, seed, device) share their frozen features
        shared = json.dumps([cell.backbone.name, cell.backbone.weights_sha256, cell.chain.canonical(),
                             dataclasses.asdict(cell.task), cell.seed, device], default=str)
        if shared not in _FEATURE_CACHE:
            _FEATURE_CACHE.clear()  # one entry: cells of a (backbone, chain) run one after another
            _FEATURE_CACHE[shared] = (_features(model, train.with_transform(transform), cell),
                                      _features(model, evaluation.with_transform(transform), cell))
        (train_f, train_y), clean = _FEATURE_CACHE[shared]
        if cell.protocol == "fewshot":
            opts = dict(recipe.fewshot)
            tops = [scores_report(fewshot_scores(train_f, train_y, clean[0], classes, opts["shots"], cell.seed * 1000 + d),
                                  clean[1], classes)["top1"] for d in range(opts["draws"])]
            mean = sum(tops) / len(tops)
            row.update(acc=mean, acc_std=(sum((t - mean) ** 2 for t in tops) / len(tops)) ** 0.5, acc_runs=tops,
                       shots=opts["shots"], draws=opts["draws"], params=info.total_params, dtype=_dtype(model, device))
            return row
        if cell.protocol == "retrieval":
            scores = retrieval_scores(train_f, train_y, clean[0], clean[1])
            row.update(retrieval=scores, acc=scores["map@r"], params=info.total_params, dtype=_dtype(model, device))
            return row
        score = knn_scores if cell.protocol == "knn" else linear_probe_scores

        def evaluate(data=None):  # None: the clean evaluation split
            test_f, labels = clean if data is None else _features(model, data, cell)
            return scores_report(score(train_f, train_y, test_f, classes), labels, classes)["top1"]

    row["params"] = info.total_params
    row["dtype"] = _dtype(model, device) + ("+bf16-autocast" if cell.protocol in TRAINED and device.startswith("cuda")
                                            else "")
    row["acc"] = evaluate()
    if cell.protocol == "robust":  # acc: robust accuracy; clean_acc: the same images unattacked
        from vitkit.robust.bench import robust_accuracy

        row.update(robust_accuracy(model, evaluation, json.loads(cell.settings)["robust"], cell.backbone.data,
                                   cell.seed, device))
        return row
    if recipe.ood:
        from .ood import OODDataset

        row["ood"] = {v: evaluate(OODDataset(evaluation, v, seed=cell.seed).with_transform(transform))
                      for v in recipe.ood}
        row["ood_mean"] = sum(row["ood"].values()) / len(row["ood"])
    return row


def param_counts(model):
    """Total and trainable parameters (what the rows need of `vk.info`, for any timm model)."""
    from types import SimpleNamespace

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return SimpleNamespace(total_params=total, trainable_params=trainable, trainable_fraction=trainable / max(1, total))


def trained_bytes(model) -> int:
    """Bytes of the trainable tensors as one safetensors file: what a task adds on top of its backbone (the
    whole model for full fine-tuning), whatever `vk.save` must write for a backbone it cannot recreate."""
    from safetensors.torch import save

    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return len(save(tensors)) if tensors else 0


# ---------------------------------------------------------------------------------------------- the run
class BenchResult:
    """Rows of a finished run, plus what this call computed (for resume checks)."""

    def __init__(self, out: Path, rows: list[dict], computed: list[str]):
        self.out, self.rows, self.computed = out, rows, computed

    def table(self) -> str:
        return (self.out / "results.md").read_text()


def cells_of(recipe: Recipe, device: str = "cpu") -> list[Cell]:
    return recipe.cells(device, perf_fingerprint(device) if recipe.perf else None)


def perf_fingerprint(device: str) -> dict:
    """What makes perf rows comparable: device, its name, threads, torch and timm versions."""
    f = fingerprint(device)
    return {k: f[k] for k in ("device", "device_name", "threads", "torch", "timm")}


def _forced(cell: Cell, force) -> bool:
    return any(fnmatch.fnmatchcase(cell.id, g) or fnmatch.fnmatchcase(cell.key, g) for g in force)


def bench(recipe: Recipe | dict | str | os.PathLike | list, methods=(), data=("digits",), protocols=None, *,
          out: str | os.PathLike = "runs/bench", executor: str = "local", ray_address: Optional[str] = None,
          device: str = "cpu", resume: bool = True, retry_failed: bool = False, force=(), progress: bool = True,
          on_row: Optional[Callable[[dict], None]] = None) -> BenchResult:
    """Run a recipe (a `Recipe`, a dict, or a YAML path) and return the rows of the whole run folder.

    `vk.bench(["vit_tiny_patch16_224", "my.pth"], ["lora", "tome:r=4"], ["digits", {"name": "mine",
    "root": "imgs/", "train": 50, "eval": 20}], out="runs/x")` builds the recipe from lists: backbones, method
    chains and tasks (see `load_recipe` for entries). The recipe is validated entirely before any cell runs.
    `resume=False` starts the run folder clean (rows and checkpoints); `force` globs (matched against a
    cell's `backbone/chain/task/protocol/sSEED` id or its key) recompute those cells from scratch.
    """
    if isinstance(recipe, (list, tuple)):
        recipe = {"backbones": list(recipe), "chains": list(methods) if not isinstance(methods, str) else methods,
                  "tasks": list(data), **({"protocols": list(protocols)} if protocols else {})}
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    force = (force,) if isinstance(force, str) else tuple(force)
    out = Path(out)
    rows_path = out / "rows.jsonl"
    if not resume:
        if rows_path.exists():
            rows_path.unlink()
        shutil.rmtree(out / "cells", ignore_errors=True)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    existing = read_rows(rows_path, repair=True)
    done = {r["key"] for r in existing if r["status"] == "ok" or not retry_failed}
    cells = cells_of(recipe, device)
    todo = [c for c in cells if c.key not in done or _forced(c, force)]
    for cell in todo:
        if _forced(cell, force):
            shutil.rmtree(out / "cells" / cell.key, ignore_errors=True)
    (out / "env.json").write_text(json.dumps(fingerprint(device), indent=2))
    computed: list[str] = []
    recorder = _Recorder(rows_path, existing, cells, todo, git_commit(), computed, on_row)
    try:
        if executor == "local":
            _run_local(todo, recipe, out, device, recorder, progress, resume)
        elif executor == "ray":
            _run_ray(todo, recipe, out, device, recorder, ray_address, resume)
        else:
            raise ValueError(f"unknown executor `{executor}`; use 'local' or 'ray'")
    finally:
        recorder.flush()
        report.write(out, read_rows(rows_path))
    return BenchResult(out, read_rows(rows_path), computed)


class _Recorder:
    """Appends rows, adding `git_commit`, `baseline_acc` and `delta_acc` (the baseline cell of the same
    backbone, task, protocol and seed; rows wait, in memory, for a baseline still running)."""

    def __init__(self, path: Path, existing: list[dict], cells: list[Cell], todo: list[Cell], commit,
                 computed: list, on_row):
        self.path, self.commit, self.computed, self.on_row = path, commit, computed, on_row
        base = {(c.backbone.name, c.task.name, c.protocol, c.seed): c.key for c in cells if not c.chain.steps}
        self.baseline_key = {c.key: base.get((c.backbone.name, c.task.name, c.protocol, c.seed)) for c in cells}
        self.pending_baselines = {c.key for c in todo if not c.chain.steps}
        self.acc = {r["key"]: r.get("acc") for r in existing if r["status"] == "ok"}
        self.waiting: list[dict] = []

    def __call__(self, row: dict) -> None:
        row["git_commit"] = self.commit
        self.waiting.append(row)
        if row["key"] in self.pending_baselines:
            self.pending_baselines.discard(row["key"])
            if row["status"] == "ok":
                self.acc[row["key"]] = row.get("acc")
        self._drain()

    def _drain(self, final: bool = False) -> None:
        keep = []
        for row in self.waiting:
            base = self.baseline_key.get(row["key"])
            if base in self.pending_baselines and not final:
                keep.append(row)
                continue
            if row["protocol"] != "perf":
                row["baseline_acc"] = self.acc.get(base)
                row["delta_acc"] = (row["acc"] - row["baseline_acc"] if row.get("acc") is not None
                                    and row["baseline_acc"] is not None else None)
            append_row(self.path, row)
            self.computed.append(row["key"])
            if self.on_row is not None:
                self.on_row(row)
        self.waiting = keep

    def flush(self) -> None:
        self._drain(final=True)


def _run_local(todo, recipe, out, device, record, progress, resume) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not progress) as bar:
        task = bar.add_task("", total=len(todo))
        for cell in todo:
            bar.update(task, description=cell.label())
            record(run_cell(cell, recipe, out, device, resume))
            bar.advance(task)


def ray_options(cell: Cell, recipe: Recipe, device: str) -> dict:
    """Ray task options of a cell: `num_cpus` / `num_gpus` from the recipe's `resources` for its kind (GPUs
    default to 1 on a CUDA run), and the node resource: a perf cell takes it whole, so nothing else runs on
    its node while it times; every other cell takes a sliver of it."""
    res = recipe.resources_for(cell.kind)
    gpus = res.gpus if res.gpus is not None else (1 if device.startswith("cuda") else 0)
    return {"num_cpus": res.cpus, "num_gpus": gpus, "max_retries": recipe.max_retries,
            "resources": {NODE_RESOURCE: 1.0 if cell.kind == "perf" else 0.001}}


def _run_ray(todo, recipe, out, device, record, address, resume) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install \"vitkit[ray]\"") from None
    started_here = not ray.is_initialized()
    if started_here:
        local = address is None
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({"resources": {NODE_RESOURCE: 1}} if local else {}),
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        if ray.cluster_resources().get(NODE_RESOURCE, 0) < 1:
            raise RuntimeError(f"ray executor: the cluster has no `{NODE_RESOURCE}` resource; start every node "
                               f"with `ray start ... --resources '{{\"{NODE_RESOURCE}\": 1}}'` (perf cells hold a "
                               "node alone)")
        remote = ray.remote(run_cell)
        pending = {}
        for cell in todo:
            pending[remote.options(**ray_options(cell, recipe, device)).remote(cell, recipe, out.resolve(), device,
                                                                               resume)] = cell
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - a crashed worker is an error row, as in the local executor
                message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                row = error_row(cell, f"{type(err).__name__}: {message} (after {recipe.max_retries} "
                                      "retries)", device)
                _log.warning("cell %s failed: %s", cell.label(), row["error"])
            record(row)
    finally:
        if started_here:
            ray.shutdown()


def dry_run(recipe: Recipe, out: Path, device: str = "cpu") -> list[tuple[Cell, bool]]:
    """Every cell of the recipe and whether it is already finished."""
    done = {r["key"] for r in read_rows(Path(out) / "rows.jsonl") if r["status"] == "ok"}
    return [(c, c.key in done) for c in cells_of(recipe, device)]
