"""`vitkit attack`: the command-line face of `vk.attack` on a folder of images or a bundled dataset.

    vitkit attack best_vit.pth --model-arg num_heads=4 --model-arg num_classes=10 --mean 0.5 --std 0.5 \
        --data ../shared/data/cifar10-test-jpeg/test --n 500 --method pgd --eps 1/255,2/255,4/255 --out runs/attack

Every attack's config field is a flag (`--eps`, `--alpha`, `--steps`, `--random-start false`, `--norm l2`,
...; numbers may be fractions such as 8/255); `--eps` takes a comma-separated list (one row per value).
Writes `attack.json` (one report per ε, with the command's settings) and `attack.md` (one Markdown table line
per ε) into `--out`, and prints both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def number(text: str):
    """'8/255' -> 0.0313..., '0.5' -> 0.5, '3' -> 3, 'true' -> True, else the string (YAML rules)."""
    from vitkit.cli import parse_value

    text = str(text).strip()
    if "/" in text:
        try:
            top, bottom = text.split("/")
            return float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction such as 8/255, got {text!r}") from None
    return parse_value(text)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def sample(dataset, n, seed: int) -> list[int]:
    """`n` indices of `dataset` drawn uniformly without replacement with `seed` (sorted); all when n is None."""
    import torch

    total = len(dataset)
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def load_pixels(model, data: str, n, seed: int, skip_bad: bool = False):
    """(images (N, C, H, W) pixels in [0, 1], labels (N,), class names, indices) of `n` images of `data` (an
    image folder or a bundled dataset name) through `vk.robust.pixel_transform(model)`."""
    import torch

    from vitkit.data import get

    from .api import pixel_transform

    if not data:
        raise ValueError("--data is required (an image folder root/<class>/*.jpg, or `digits`)")
    kwargs = {"skip_bad": skip_bad} if Path(str(data)).expanduser().is_dir() else {}
    dataset = get(data, **kwargs)
    indices = sample(dataset, n, seed)
    dataset = dataset.with_transform(pixel_transform(model))
    pairs = [dataset[i] for i in indices]
    return (torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs]), list(dataset.classes),
            indices)


def _config_fields() -> dict[str, tuple[str, str]]:
    """Every registered attack's config fields: name -> (help, the attacks that have it)."""
    from .api import attacks

    out: dict[str, tuple[str, list[str]]] = {}
    for atk in attacks():
        for name, type_name, default, help_text in atk.fields():
            entry = out.setdefault(name, (f"{help_text} ({type_name})", []))
            entry[1].append(f"{atk.name}: {default!r}" if not isinstance(default, float) else
                             f"{atk.name}: {default:.6g}")
    return {k: (h, ", ".join(d)) for k, (h, d) in out.items()}


def markdown_row(model: str, data: str, report: dict) -> str:
    cfg = report["config"]
    eps = cfg.get("eps")
    eps_text = "-" if eps is None else f"{eps:.6g} ({eps * 255:.3g}/255)"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    return (f"| {model} | {data} | {report['n']} | {report['method']} | {cfg.get('norm', '-')} | {eps_text} | "
            f"{'targeted' if report['targeted'] else 'untargeted'} | {pct(report['clean_accuracy'])} | "
            f"{pct(report['robust_accuracy'])} | {pct(report['attack_success_rate'])} |")


HEADER = ("| model | data | n | method | norm | ε | mode | clean acc | robust acc | ASR |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _run_attack(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit.cli import load_model
    from vitkit.io import atomic_write

    from .api import get_attack

    spec = get_attack(args.method)  # an unknown attack fails before the model loads
    config = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    eps_list = [number(e) for e in str(config.pop("eps")).split(",")] if "eps" in config else [None]
    config = {k: number(v) for k, v in config.items()}
    model = load_model(args)
    if args.mean is not None or args.std is not None:
        from vitkit.models.loading import set_data_config

        set_data_config(model, **{k: v[0] if len(v) == 1 else v for k, v in (("mean", args.mean), ("std", args.std))
                                  if v is not None})
    images, labels, classes, indices = load_pixels(model, args.data, args.n, args.sample_seed, args.skip_bad)
    num_classes = getattr(model, "num_classes", None)
    heads_match = not num_classes or len(classes) == num_classes
    if not heads_match and spec.needs_labels:
        raise ValueError(f"the model has {num_classes} classes but {args.data} has {len(classes)}; attack a model "
                         f"whose head matches the data (e.g. --num-classes {len(classes)} after fine-tuning)")
    targets = None if args.target is None else args.target
    reports = []
    for eps in eps_list:
        kwargs = dict(config, **({} if eps is None else {"eps": eps}))
        # the data's own labels whenever the head scores them, also for a label-free attack such as dta (its
        # clean accuracy is then the model's, not 1.0 against its own predictions)
        result = vk.attack(model, images, labels if heads_match else None, method=args.method, targets=targets,
                           backend=args.backend, batch_size=args.batch_size, seed=args.seed,
                           progress=not args.no_progress, **kwargs)
        reports.append(result.report())
    out = Path(args.out)
    summary = {"model": args.model, "data": str(args.data), "n": len(indices), "n_requested": args.n,
               "sample_seed": args.sample_seed, "seed": args.seed, "mean": list(result.mean), "std": list(result.std), "reports": reports}
    atomic_write(out / "attack.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    table = "\n".join([HEADER] + [markdown_row(Path(args.model).name, Path(str(args.data)).name, r) for r in reports])
    atomic_write(out / "attack.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)
    print(f"results: {out / 'attack.json'} and {out / 'attack.md'}")


def add_commands(sub) -> None:
    """Add `attack` to the `vitkit` command line."""
    from vitkit.cli import _model_args

    from .api import attacks

    p = sub.add_parser("attack", help="adversarial attack (PGD, FGSM, ...): clean / robust accuracy and ASR",
                       description="Attack a model on images (vk.attack): the ε ball is in pixel space [0, 1]; "
                                   "normalisation is the model's own (or --mean/--std).")
    _model_args(p)
    p.add_argument("--data", help="image folder (root/<class>/*.jpg) or a bundled dataset: digits")
    p.add_argument("--n", type=int, help="attack a uniform random sample of N images (default: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --n sample")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images")
    p.add_argument("--method", default="pgd", choices=[a.name for a in attacks()], help="the attack")
    for name, (help_text, defaults) in _config_fields().items():
        extra = "; a comma-separated list runs one attack per value" if name == "eps" else ""
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", default=None, metavar="VALUE",
                       help=f"{help_text}; default {defaults}{extra}")
    p.add_argument("--target", type=int, help="targeted attack towards this class (default: untargeted)")
    p.add_argument("--backend", choices=("vitkit", "torchattacks"), default="vitkit",
                   help="torchattacks: cross-check with torchattacks' implementation (pip install vitkit[attack])")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's random start")
    p.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="normalisation mean (default: the model's)")
    p.add_argument("--std", type=_floats, metavar="S[,S,S]", help="normalisation std (default: the model's)")
    p.add_argument("--out", default="runs/attack", help="folder for attack.json and attack.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_attack)
