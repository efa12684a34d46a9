"""`vitkit explora`: ExPLoRA's recipe from the command line (`vitkit.adapt.explora.recipe`).

    vitkit explora vitkit/vit-tiny-cifar --data digits --split train=20,val=10 --unlabelled-part train \
        --pretrain-epochs 5 --epochs 5 --out runs/explora
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run_explora(args: argparse.Namespace) -> None:
    from vitkit import data
    from vitkit.cli import load_model, parse_pairs
    from vitkit.train.commands import apply_recipe, load_data

    from .explora import recipe

    args = apply_recipe(args)
    parts = load_data(args)
    for flag, part in (("--train-part", args.train_part), ("--unlabelled-part", args.unlabelled_part)):
        if part and part not in parts:
            raise ValueError(f"{flag} {part!r} is not a split part; parts: {', '.join(parts)} (give --split)")
    if args.unlabelled and args.unlabelled_part:
        raise ValueError("give --unlabelled (another folder) or --unlabelled-part (a part of --data), not both")
    if not (args.unlabelled or args.unlabelled_part):
        raise ValueError("phase 1 needs target-domain images: --unlabelled FOLDER (or `digits`) or "
                         "--unlabelled-part PART of --data")
    train = parts[args.train_part]
    unlabelled = parts[args.unlabelled_part] if args.unlabelled_part else data.get(args.unlabelled)
    args.num_classes = args.num_classes or len(train.classes)
    model = load_model(args)
    val = parts.get(args.val_part) if args.val_part != args.train_part else None
    train = train.with_transform(data.transform(model, train=True))
    val = val.with_transform(data.transform(model)) if val is not None else None
    out = Path(args.out)
    result = recipe(model, unlabelled, train, val, objective=args.objective, pretrain_epochs=args.pretrain_epochs,
                    epochs=args.epochs, finetune=args.finetune, finetune_config=parse_pairs(args.finetune_set),
                    pretrain_config=parse_pairs(args.pretrain_set), batch_size=args.batch_size, seed=args.seed,
                    out_dir=out, progress=not args.no_progress, **parse_pairs(args.set))
    fit = result["finetune"]
    print(json.dumps({"run_dir": str(out), "pretrain_last": result["pretrain"][-1] if result["pretrain"] else None,
                      "finetune_last": fit.history[-1] if fit.history else None, "best": fit.best}, indent=2))
    print(f"results: {out / 'pretrain'} (phase 1), {out / 'finetune'} (phase 2; the model: "
          f"{out / 'finetune' / 'model'})")


def add_commands(sub) -> None:
    """Add `explora` to the `vitkit` command line."""
    from vitkit.cli import _model_args
    from vitkit.train.commands import _data_args, _recipe

    p = sub.add_parser("explora", help="ExPLoRA: continued self-supervised pre-training on the target domain with "
                                       "partial unfreezing + LoRA, then a LoRA fine-tune",
                       description="Phase 1: unfreeze the chosen blocks and every norm, LoRA on the others, continue "
                                   "self-supervised pre-training (vk.pretrain) on unlabelled target-domain images; "
                                   "merge. Phase 2: a fresh LoRA (or linear probe) fine-tuned with vk.fit.")
    _model_args(p)
    _data_args(p, "train", "train")
    p.add_argument("--val-part", default="val", help="split part to validate on each epoch (if present)")
    p.add_argument("--unlabelled", help="phase-1 images: an image folder or `digits` (labels ignored)")
    p.add_argument("--unlabelled-part", help="phase-1 images: this split part of --data (labels ignored)")
    p.add_argument("--objective", default="mae", help="self-supervised objective (vitkit pretrain --help)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="explora Config field, e.g. rank=16 or unfreeze_blocks=[-2,-1] (vitkit methods --kind adapt)")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="objective Config field for phase 1, e.g. mask_ratio=0.6 or backbone_lr=1e-4")
    p.add_argument("--finetune", default="lora", choices=("lora", "linear"), help="phase-2 method")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="phase-2 method Config field, e.g. rank=8")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10, help="phase-2 epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/explora", help="run folder (pretrain/ and finetune/ inside)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _recipe(p)
    p.set_defaults(func=_run_explora)
