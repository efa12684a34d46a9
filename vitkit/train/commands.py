"""`vitkit train`, `vitkit eval` and `vitkit demo`: the command-line faces of `vk.fit`, `vk.evaluate`, the demo.

Every option can also come from a YAML recipe (`--config recipe.yaml`, keys = option names with `_`); flags
given on the command line win over the recipe.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

_log = logging.getLogger("vitkit")


def _recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe: option names as keys; flags win")
    parser.set_defaults(_defaults={a.dest: a.default for a in parser._actions})


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options not given on the command line from `args.config` (a YAML mapping)."""
    if not getattr(args, "config", None):
        return args
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    try:
        from vitkit.cli import yaml_load

        recipe = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        from vitkit.cli import yaml_problem

        raise ValueError(f"--config {args.config}: not valid YAML{yaml_problem(err)}; fix the file (a recipe is a "
                         "mapping of option names, e.g. `epochs: 3`)") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"--config {args.config}: a recipe is a mapping of option names (e.g. `epochs: 3`), got a "
                         f"{type(recipe).__name__}")
    defaults = args._defaults
    for key, value in recipe.items():
        dest = key.replace("-", "_")
        if dest not in defaults:
            raise ValueError(f"{args.config}: unknown option `{key}`; options: {', '.join(sorted(defaults))}")
        if getattr(args, dest) == defaults[dest]:
            setattr(args, dest, value)
    return args


def _data_args(parser: argparse.ArgumentParser, part: str, default_part: str) -> None:
    parser.add_argument("--data", required=False, help="image folder (root/<class>/*.jpg) or a bundled dataset: digits")
    parser.add_argument("--split", default=None, metavar="PART=N,...",
                        help="stratified split, counts per class (train=800,test=200) or fractions (train=0.8,test=0.2)")
    parser.add_argument("--split-seed", default=0, type=lambda s: None if s.lower() == "none" else int(s),
                        help="split shuffle seed; `none` keeps the folder order (first N per class)")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images")
    parser.add_argument(f"--{part}-part", default=default_part, help=f"which split part to {part} on")


def load_data(args: argparse.Namespace) -> dict:
    """The dataset of `--data`, split by `--split` into named parts (`{"all": ds}` without a split)."""
    from vitkit import data
    from vitkit.cli import parse_pairs

    if not args.data:
        raise ValueError("--data is required (an image folder, or `digits`)")
    kwargs = {"skip_bad": args.skip_bad, "preload": True} if Path(str(args.data)).expanduser().is_dir() else {}
    dataset = data.get(args.data, **kwargs)
    if not args.split:
        return {"all": dataset}
    parts = parse_pairs([p for p in str(args.split).split(",") if p])
    return data.split(dataset, seed=args.split_seed, **parts)


def train_split(args: argparse.Namespace) -> tuple[dict, object]:
    """The parts of `--data` (`load_data`) and the one `--train-part` names (the whole dataset without --split)."""
    parts = load_data(args)
    if args.train_part not in parts and list(parts) != ["all"]:
        raise ValueError(f"--train-part {args.train_part!r} is not a split part; parts: {', '.join(parts)}")
    return parts, parts.get(args.train_part, parts.get("all"))


def _run_args(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every training command shares (`vk.fit`'s loop, the run folder `out`), then the recipe."""
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--out", default=out, help="run folder (checkpoints, metrics, model/)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=(True, "force"), metavar="force",
                        help="continue from OUT/last.pt (refused when its settings differ; `--resume force` continues)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _recipe(parser)


def _aug_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aug", action="append", default=[], metavar="KEY=VALUE",
                        help="training transform option for timm create_transform, e.g. scale=[0.35,1] (repeatable)")


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", metavar="FILE.safetensors",
                        help="also write the final weights to this file (a bare name: inside the run folder)")
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "float16", "bfloat16"))


# --- vitkit train ------------------------------------------------------------------------------------------
def _run_train(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit import data
    from vitkit.cli import apply_specs, load_model, parse_pairs

    from .fit import NonFiniteLossError
    from .hparams import default_hparams

    args = apply_recipe(args)
    parts, train = train_split(args)
    args.num_classes = args.num_classes or len(train.classes)
    model = load_model(args)
    from vitkit.registry import get

    trains = [m for m in args.method if get(m.partition(":")[0]).kind != "augment"]  # augmentations train nothing
    apply_specs(model, (["full"] if not trains else []) + args.method)
    aug = parse_pairs(args.aug)
    train = train.with_transform(data.transform(model, train=True, **aug))
    val = parts.get(args.val_part)
    val = val.with_transform(data.transform(model)) if val is not None and args.val_part != args.train_part else None
    out = Path(args.out)
    export_path = export_target(args.export, out, args.replace_embedded) if args.export else None  # before training
    try:
        result = vk.fit(model, train, val, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                        grad_accum=args.grad_accum, clip_grad=args.clip_grad, label_smoothing=args.label_smoothing,
                        seed=args.seed, out_dir=out, resume=args.resume, num_workers=args.workers,
                        progress=not args.no_progress)
    except NonFiniteLossError as err:
        lr = args.lr if args.lr is not None else default_hparams(model)["lr"]
        raise NonFiniteLossError(f"{err} (vitkit train: lr {lr:g}" + (" from --lr" if args.lr is not None else "")
                                 + f"; e.g. --lr {lr / 10:g})") from None
    if export_path is not None:
        print(f"exported weights: {export(model, export_path, dtype=args.export_dtype)}")
    summary = {"run_dir": str(result.run_dir), "last": result.history[-1] if result.history else None,
               "best": result.best}
    print(json.dumps(summary, indent=2))
    print(f"results: {out / 'metrics.jsonl'} (also metrics.csv, last.pt, best.pt, model/)")


def export_target(export: str, run_dir: Path, replace_embedded: str | None = None) -> Path:
    """Where `--export` writes: a bare file name goes into the run folder; a path is taken as given.

    Never into the installed package (where the embedded models live) unless `replace_embedded` holds the first
    8 or more hex digits of the SHA-256 of the file being replaced: an explicit, checked request. Checked before
    training, so a refused export costs nothing.
    """
    import hashlib

    import vitkit

    path = Path(export).expanduser()
    path = run_dir / path if path.parent == Path(".") else path
    package = Path(vitkit.__file__).resolve().parent
    target = path.resolve()
    if not target.is_relative_to(package):
        if replace_embedded:
            raise ValueError(f"--replace-embedded is only for a file inside the vitkit package ({package}); "
                             f"--export {export} is not one")
        return path
    digest = hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else None
    if not replace_embedded:
        state = f"the shipped file (sha256 {digest[:12]}...)" if digest else "a path inside the package"
        raise ValueError(f"--export {export} would overwrite {state} inside the vitkit package, so "
                         "`vk.load` would silently load this run's weights and adapters saved on the old ones "
                         "would stop loading; export to the run folder (--export NAME.safetensors writes "
                         f"{run_dir}/NAME.safetensors) or, to replace it on purpose, add --replace-embedded "
                         f"{digest[:12] if digest else 'new'}")
    wanted = replace_embedded.lower()
    ok = wanted == "new" and digest is None or digest is not None and len(wanted) >= 8 and digest.startswith(wanted)
    if not ok:
        raise ValueError(f"--replace-embedded {replace_embedded}: {target} has sha256 "
                         f"{digest[:12] + '...' if digest else 'none (no such file)'}; pass its first 8+ hex digits "
                         "to replace it")
    return path


def export(model, path: str | Path, dtype: str = "float32") -> Path:
    """Write the model's whole state dict to a safetensors file (for embedding or sharing)."""
    import torch
    from safetensors.torch import save_file

    from vitkit.io import atomic_write

    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: v.detach().cpu().to(cast if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"producer": "vitkit train --export"}))
    return Path(path)


def _add_train(sub) -> None:
    from vitkit.cli import _model_args

    p = sub.add_parser("train", help="fine-tune a model (vk.fit): checkpoints, resume, metrics",
                       description="Fine-tune what the applied methods leave trainable (default: full).")
    _model_args(p)
    _data_args(p, "train", "train")
    p.add_argument("--val-part", default="val", help="split part to validate on each epoch (if present)")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="method(s) to apply first, e.g. lora:rank=8, or an augmentation (transmix, foraug: "
                        "vitkit methods --kind augment); default full (also when only augmentations are given)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the applied methods' own, see vitkit methods; printed)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: as --lr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    _aug_args(p)
    _export_args(p)
    p.add_argument("--replace-embedded", metavar="SHA256_PREFIX",
                   help="allow --export to replace a file inside the vitkit package (an embedded model); give the "
                        "first 8+ hex digits of the replaced file's SHA-256 (the refusal prints them)")
    _run_args(p, "runs/train")
    p.set_defaults(func=_run_train)


# --- vitkit eval -------------------------------------------------------------------------------------------
def _run_eval(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit import data
    from vitkit.cli import apply_specs, load_model
    from vitkit.io import atomic_write

    from .evaluate import format_report

    args = apply_recipe(args)
    parts = load_data(args)
    test = parts.get(args.eval_part, parts.get("all"))
    if test is None:
        raise ValueError(f"--eval-part {args.eval_part!r} is not a split part; parts: {', '.join(parts)}")
    model = load_model(args)
    apply_specs(model, args.method)
    tf = data.transform(model)
    test = test.with_transform(tf)
    train = parts.get(args.train_part)
    train = train.with_transform(tf) if train is not None else None
    needs = [p for p in args.protocol if p not in ("finetuned", "retrieval")]  # retrieval can go without (leave-one-out)
    if needs and train is None:
        how = ("pass --split, e.g. --split train=800,test=200" if not args.split else
               f"--train-part {args.train_part!r} is not a split part ({', '.join(parts)})")
        raise ValueError(f"--protocol {needs[0]} needs reference images (--train-part {args.train_part}): {how}")
    results = {}
    for protocol in args.protocol or ["finetuned"]:
        results[protocol] = vk.evaluate(model, test, protocol, train=train, k=args.k, shots=args.shots,
                                        seeds=args.seeds)
        print(format_report(results[protocol]))
    out = Path(args.out)
    summary = {"model": args.model, "data": str(args.data), "split": args.split, "split_seed": args.split_seed,
               "eval_part": args.eval_part, "results": results}
    atomic_write(out / "eval.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    rows = ["| protocol | top-1 | top-5 | n |", "|---|---|---|---|"]
    for name, r in results.items():
        std = f" ± {r['top1_std']:.4f}" if "top1_std" in r else ""
        top5 = f"{r['top5']:.4f}" if "top5" in r else f"MAP@R {r['map@r']:.4f}"  # retrieval: top-1 is Recall@1
        rows.append(f"| {name} | {r['top1']:.4f}{std} | {top5} | {r['n']} |")
    atomic_write(out / "eval.md", lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    print(f"results: {out / 'eval.json'} and {out / 'eval.md'}")


def _add_eval(sub) -> None:
    from vitkit.cli import _model_args

    p = sub.add_parser("eval", help="measure a model: finetuned head, linear probe, k-NN, few-shot",
                       description="Evaluate with one or more protocols (vk.evaluate).")
    _model_args(p)
    _data_args(p, "eval", "test")
    p.add_argument("--train-part", default="train", help="split part used as probe / k-NN / few-shot reference")
    p.add_argument("--protocol", action="append", choices=("finetuned", "linear", "knn", "fewshot", "retrieval"),
                   default=[], help="protocol (repeatable; default finetuned; retrieval: Recall@K and MAP@R against "
                                    "the train part as gallery, or leave-one-out when there is none)")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]", help="apply a method first")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--shots", type=int, default=5, help="few-shot support images per class")
    p.add_argument("--seeds", type=int, default=5, help="few-shot draws")
    p.add_argument("--out", default="runs/eval", help="folder for eval.json and eval.md")
    _recipe(p)
    p.set_defaults(func=_run_eval)


def add_commands(sub) -> None:
    """Add `train`, `eval` and `demo` to the `vitkit` command line."""
    _add_train(sub)
    _add_eval(sub)
    try:
        from .demo import add_command as add_demo
    except ImportError:
        pass
    else:
        add_demo(sub)
