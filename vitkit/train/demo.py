"""`vitkit demo`: the whole toolkit, offline, in a few minutes on a laptop CPU.

The embedded model (`vitkit/vit-tiny-cifar`, pretrained on CIFAR-10 photos) is adapted to another domain,
scikit-learn's handwritten digits (shipped in its wheel), by every adaptation method registered at run time
(`vk.methods("adapt")`), each with the same budget: the same images, epochs, batch size, seed and freshly
initialised head, and each method's own learning rate and weight decay (its `Config`'s `lr` / `weight_decay`,
from its paper or the PETL benchmarks; `--lr` sets one for all). No method is tuned here: per-task tuning
belongs to `vitkit bench` (`budget: {tune: ...}`). A method added to `vitkit/adapt/` appears here by existing; a
method that fails becomes a row with its error. Results: `results.json`, `results.md` and
`accuracy_vs_params.png` in the output folder, whose path is printed at the end.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_log = logging.getLogger("vitkit")

EMBEDDED_NAME = "vitkit/vit-tiny-cifar"


@dataclass(frozen=True)
class DemoConfig:
    """The shared budget of every method in the demo."""

    model: str = EMBEDDED_NAME
    train_per_class: int = 50
    test_per_class: int = 50
    epochs: int = 3
    lr: Optional[float] = None  # None: each method's own Config lr (and weight decay); a value: that lr for all
    batch_size: int = 32
    seed: int = 0
    methods: Optional[tuple[str, ...]] = None  # None: every registered adapt method


def downstream_task(model, cfg: DemoConfig):
    """(train, test) digits datasets with the model's transforms: a stratified seeded split."""
    from vitkit import data

    parts = data.split(data.digits(), seed=cfg.seed, train=cfg.train_per_class, test=cfg.test_per_class)
    tf = data.transform(model)
    return parts["train"].with_transform(tf), parts["test"].with_transform(tf)


def fresh_model(cfg: DemoConfig, num_classes: int):
    """The pretrained model with a new head, initialised identically for every method."""
    import vitkit as vk

    model = vk.load(cfg.model)
    torch.manual_seed(cfg.seed)
    model.reset_classifier(num_classes)
    return model


@torch.inference_mode()
def throughput(model, images: torch.Tensor, batch_size: int = 100, repeats: int = 2) -> float:
    """Inference images per second over `images` (best of `repeats` passes after one warm-up batch)."""
    model.eval()
    model(images[:batch_size])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_method(name: str, cfg: DemoConfig, train, test, test_images: torch.Tensor, out: Path, on_epoch) -> dict:
    """Adapt, train, save, evaluate and time one method; returns its row."""
    import vitkit as vk

    model = fresh_model(cfg, len(train.classes))
    vk.adapt(model, name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    fitted = vk.fit(model, train, None, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                    warmup_epochs=min(1.0, cfg.epochs / 3), out_dir=out / "runs" / name, progress=False,
                    on_epoch_end=on_epoch, save_model=False)
    train_time = time.perf_counter() - start
    saved = vk.save(model, out / "adapters" / name)
    result = vk.evaluate(model, test, "finetuned")
    return {"method": name, "status": "ok", "accuracy": result["top1"], "top5": result["top5"],
            "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
            "adapter_bytes": folder_bytes(saved), "lr": fitted.config["lr"],
            "weight_decay": fitted.config["weight_decay"], "lr_source": fitted.config["lr_source"],
            "train_time_s": train_time,
            "inference_img_per_s": throughput(model, test_images), "error": None}


def run_demo(cfg: DemoConfig, out: str | Path = "vitkit-demo", progress: bool = True) -> dict:
    """Run every adaptation method on the downstream task and write the table and the plot; returns the JSON."""
    import vitkit as vk
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    probe_model = fresh_model(cfg, 10)
    train, test = downstream_task(probe_model, cfg)
    test_images = torch.stack([test[i][0] for i in range(len(test))])
    names = list(cfg.methods) if cfg.methods else [m.name for m in vk.methods("adapt")
                                                   if not getattr(m.config, "INPUT", None)  # input adapters: no images
                                                   and not getattr(m.config, "OUTPUT", None)]  # dense: no classes
    rows, started = [], time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task("vitkit demo", total=len(names) * cfg.epochs)
        for name in names:
            bar.update(task, description=f"adapting with {name}")
            done_epochs = []

            def on_epoch(metrics, done=done_epochs):
                done.append(metrics["epoch"])
                bar.advance(task)

            level = _log.level
            _log.setLevel(max(level, logging.WARNING))  # per-epoch lines of each run would drown the table
            try:
                rows.append(run_method(name, cfg, train, test, test_images, out, on_epoch))
            except Exception as err:  # noqa: BLE001 - a failing method is a row of the table, not a crash
                _log.warning("demo: method %s failed: %s: %s", name, type(err).__name__, err)
                rows.append({"method": name, "status": "error", "error": f"{type(err).__name__}: {err}"})
            finally:
                _log.setLevel(level)
            bar.advance(task, cfg.epochs - len(done_epochs))
    summary = {"model": cfg.model, "task": "scikit-learn digits (8x8 grey, resized to 32x32 RGB)",
               "budget": {k: v for k, v in cfg.__dict__.items()}, "train_images": len(train),
               "test_images": len(test), "device": "cpu" if not torch.cuda.is_available() else "cuda",
               "torch_threads": torch.get_num_threads(), "total_time_s": time.perf_counter() - started,
               "rows": rows}
    write_outputs(summary, out)
    return summary


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | accuracy | lr | trainable params | % of model | saved adapter | train time | inference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["status"] != "ok", -r.get("accuracy", 0))):
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | error: {r['error'][:120]} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['lr']:g} | {r['trainable_params']:,} "
                     f"| {r['trainable_pct']:.2f}% | {r['adapter_bytes'] / 1024:.1f} KiB | {r['train_time_s']:.1f} s "
                     f"| {r['inference_img_per_s']:.0f} img/s |")
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict, out: Path) -> None:
    """results.json, results.md and accuracy_vs_params.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.io import atomic_write

    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    budget = summary["budget"]
    lrs = "each at its own lr and weight decay (Config defaults)" if budget["lr"] is None else f"lr {budget['lr']:g}"
    header = (f"# vitkit demo\n\n{summary['model']} adapted to {summary['task']}: {summary['train_images']} train / "
              f"{summary['test_images']} test images, {budget['epochs']} epochs, batch {budget['batch_size']}, seed "
              f"{budget['seed']} for every method, "
              f"{lrs}; {summary['device']}, "
              f"{summary['torch_threads']} threads, {summary['total_time_s']:.0f} s in all.\n\n")
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(header + markdown_table(summary["rows"])))
    ok = [r for r in summary["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["trainable_params"] for r in ok], [r["accuracy"] for r in ok])
    for r in ok:
        ax.annotate(r["method"], (r["trainable_params"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{summary['model']} on digits, same budget per method")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "accuracy_vs_params.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vitkit demo: {summary['model']} -> digits ({summary['total_time_s']:.0f} s)")
    for column in ("method", "accuracy", "lr", "trainable", "adapter", "train", "inference"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column != "method",
                         overflow="ellipsis")
    rows = sorted(summary["rows"], key=lambda r: (r["status"] != "ok", -r.get("accuracy", 0)))
    for r in rows:
        if r["status"] != "ok":  # the message goes below the table: a long cell would squeeze every column
            table.add_row(r["method"], "[red]error[/red]", "", "", "", "", "")
        else:
            table.add_row(r["method"], f"{r['accuracy']:.3f}", f"{r['lr']:g}", f"{r['trainable_params']:,}",
                          f"{r['adapter_bytes'] / 1024:.1f} KiB", f"{r['train_time_s']:.1f} s",
                          f"{r['inference_img_per_s']:.0f}/s")
    console = Console()
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"[red]{r['method']}[/red]: {r['error']}", highlight=False, markup=True)


def _run(args) -> None:
    from .commands import apply_recipe

    args = apply_recipe(args)
    methods = tuple(m for m in (args.methods or "").split(",") if m) or None
    cfg = DemoConfig(model=args.model, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                     epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, methods=methods)
    summary = run_demo(cfg, args.out, progress=not args.no_progress)
    print_table(summary)
    out = Path(args.out).resolve()
    print(f"results: {out} (results.json, results.md, accuracy_vs_params.png)")


def add_command(sub) -> None:
    from .commands import _recipe

    d = DemoConfig()
    p = sub.add_parser("demo", help="every adaptation method on a downstream task, offline, side by side",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help="pretrained model (default: the embedded one)")
    p.add_argument("--methods", help="comma-separated adapt methods (default: every registered one)")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--test-per-class", type=int, default=d.test_per_class)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr,
                   help="one learning rate for every method (default: each method's own, see `vitkit methods`)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="vitkit-demo", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    _recipe(p)
    p.set_defaults(func=_run)
