"""`vitkit pretrain`: the command-line face of `vk.pretrain` (continued self-supervised pre-training).

    vitkit pretrain vitkit/vit-tiny-cifar --data digits --objective mae --epochs 5 --out runs/pretrain-mae
    vitkit bench ...  # then use runs/pretrain-mae/model (a vk.save folder) as a backbone
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run_pretrain(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit.cli import apply_specs, load_model, parse_pairs
    from vitkit.train.commands import apply_recipe, export, export_target, train_split

    args = apply_recipe(args)
    _, train = train_split(args)
    config = parse_pairs(args.set)
    for key in ("lr", "backbone_lr"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    model = apply_specs(load_model(args), args.method)
    out = Path(args.out)
    export_path = export_target(args.export, out) if args.export else None  # checked before training
    vk.pretrain(model, train, args.objective, epochs=args.epochs, batch_size=args.batch_size,
                warmup_epochs=args.warmup_epochs, grad_accum=args.grad_accum, clip_grad=args.clip_grad,
                seed=args.seed, out_dir=out, resume=args.resume, num_workers=args.workers,
                progress=not args.no_progress, **config)
    if export_path is not None:
        print(f"exported weights: {export(model, export_path, dtype=args.export_dtype)}")
    history = model.__dict__["_vitkit_pretrain"]["history"]
    print(json.dumps({"run_dir": str(out), "objective": args.objective, "last": history[-1] if history else None},
                     indent=2))
    print(f"results: {out / 'metrics.jsonl'}; the pretrained model: {out / 'model'} (vk.load / a bench backbone)")


def add_commands(sub) -> None:
    """Add `pretrain` to the `vitkit` command line."""
    from vitkit.cli import _model_args
    from vitkit.train.commands import _data_args, _export_args, _run_args

    from . import OBJECTIVES

    p = sub.add_parser("pretrain", help="continue self-supervised pre-training of a ViT (vk.pretrain): mae, dino, ...",
                       description="Continue pre-training a pretrained ViT on unlabelled images (labels are ignored) "
                                   "with a self-supervised objective; the result is the same timm model, saved in "
                                   "OUT/model.", epilog=OBJECTIVES.help("objectives and their --set fields (default):"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    _data_args(p, "train", "train")
    p.add_argument("--objective", default="mae", help="self-supervised objective (listed below)")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="adaptation method(s) to apply first (e.g. lora: only its parameters train); default: the "
                        "whole backbone trains at --backbone-lr")
    p.add_argument("--lr", type=float, default=None, help="peak lr of the objective's new parts (default: its Config)")
    p.add_argument("--backbone-lr", type=float, default=None,
                   help="peak lr of the pretrained ViT (default: its Config; low, or the pretrained features are lost)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an objective Config field, e.g. mask_ratio=0.6 (repeatable; listed below)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip-grad", type=float, default=3.0)
    _export_args(p)
    _run_args(p, "runs/pretrain")
    p.set_defaults(func=_run_pretrain)
