"""`vitkit distill TEACHER STUDENT --data ... --method kd`: the command-line face of `vk.distill`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run_distill(args: argparse.Namespace) -> None:
    import vitkit as vk
    from vitkit import data
    from vitkit.cli import apply_specs, parse_pairs
    from vitkit.train.commands import apply_recipe, train_split

    args = apply_recipe(args)
    parts, train = train_split(args)
    teacher = None
    if args.teacher.lower() != "none":
        teacher = vk.load(args.teacher, arch=args.teacher_arch, **parse_pairs(args.teacher_arg))
    student_args = parse_pairs(args.student_arg)
    num_classes = student_args.pop("num_classes", None) or getattr(teacher, "num_classes", None) or len(train.classes)
    student = vk.load(args.student, arch=args.student_arch, num_classes=num_classes,
                      pretrained=args.student_pretrained, **student_args)
    apply_specs(student, args.student_method)
    train = train.with_transform(data.transform(student, train=True, **parse_pairs(args.aug)))
    val = parts.get(args.val_part)
    val = val.with_transform(data.transform(student)) if val is not None and args.val_part != args.train_part else None
    result = vk.distill(teacher, student, train, args.method, val=val, out_dir=args.out, epochs=args.epochs,
                        lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, seed=args.seed,
                        warmup_epochs=args.warmup_epochs, resume=args.resume, num_workers=args.workers,
                        progress=not args.no_progress, **parse_pairs(args.set))
    summary = {"run_dir": str(result.run_dir), "method": args.method, "distill": result.config["distill"],
               "last": result.history[-1] if result.history else None, "best": result.best}
    print(json.dumps(summary, indent=2))
    print(f"student: {Path(args.out) / 'model'} (vk.load it, or use it as a vitkit bench backbone); metrics: "
          f"{Path(args.out) / 'metrics.jsonl'}")


def add_commands(sub) -> None:
    """Add `distill` to the `vitkit` command line."""
    from vitkit.train.commands import _aug_args, _data_args, _run_args

    from .base import METHODS

    p = sub.add_parser("distill", help="train a student from a frozen teacher (vk.distill): kd, logit-cache, ...",
                       description="Distil TEACHER into STUDENT on --data with a registered method; the student is "
                       "saved to OUT/model.",
                       epilog=METHODS.help("distillation methods (--method NAME, fields with --set KEY=VALUE):"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="teacher: timm name, weights file, save folder, embedded name; `none` for a "
                                   "method that trains from a complete cache alone")
    p.add_argument("student", help="student: timm name (random init unless --student-pretrained), file or folder")
    p.add_argument("--teacher-arch", help="timm architecture of a teacher weights file")
    p.add_argument("--teacher-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="teacher model argument, e.g. num_heads=4 (repeatable)")
    p.add_argument("--student-arch", help="timm architecture of a student weights file")
    p.add_argument("--student-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="student model argument, e.g. img_size=32 (repeatable; num_classes defaults to the teacher's)")
    p.add_argument("--student-pretrained", action="store_true", help="start the student from pretrained weights")
    p.add_argument("--student-method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="adaptation method(s) applied to the student first (default: everything trains)")
    _data_args(p, "train", "train")
    p.add_argument("--val-part", default="val", help="split part to validate the student on (if present)")
    p.add_argument("--method", default="kd", help="distillation method (listed below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="distillation method config field, e.g. alpha=0.9 (repeatable)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: vk.fit's)")
    p.add_argument("--weight-decay", type=float, default=None)
    _aug_args(p)
    _run_args(p, "runs/distill")
    p.set_defaults(func=_run_distill)
