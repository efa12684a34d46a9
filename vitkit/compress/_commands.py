"""`vitkit compress MODEL --method NAME[:k=v,...] ...`: compress, report before/after in one run, save."""
from __future__ import annotations

import argparse
import json


def _run_compress(args: argparse.Namespace) -> None:
    import copy

    import vitkit as vk
    from vitkit.cli import apply_specs, load_model

    from ._report import compare, markdown

    if not args.method:
        compress = ", ".join(m.name for m in vk.methods("compress"))
        raise ValueError(f"give at least one --method NAME[:k=v,...]; compress methods: {compress}")
    model = load_model(args).eval()
    baseline = copy.deepcopy(model)
    apply_specs(model, args.method)
    data = None
    if args.data:
        data = vk.data.get(args.data)
        if args.limit and args.limit < len(data):  # an even subsample of the classes, same every run
            per_class = max(1, args.limit // len(data.classes))
            data = vk.data.split(data, seed=None, eval=per_class)["eval"]
        data = data.with_transform(vk.data.transform(model))
    row = compare(baseline, model, data=data, speed=not args.no_speed, batch=args.batch, device=args.device)
    row["methods"] = args.method
    if data is not None:
        row["n_eval"] = len(data)
    print(markdown(row, " + ".join(args.method)))
    if args.out:
        print(f"saved to {vk.save(model, args.out)}")
    if args.json:
        from vitkit.io import atomic_write

        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(row, indent=2, default=str)))


def add_commands(sub) -> None:
    from vitkit.cli import _model_args

    p = sub.add_parser("compress", help="prune / quantise a model, report size, FLOPs, speed, memory and accuracy "
                       "before and after, save it",
                       description="Apply methods in order (--method; compress methods last: prune, int8, int4, "
                       "and any adapt/accelerate method before them), then print one before/after table (the "
                       "report contract, docs/compress.md) measured in this run. Example: vitkit compress "
                       "vitkit/vit-tiny-cifar --method prune:sparsity=0.5 --method int8 --out pruned-int8")
    _model_args(p)
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="method to apply, in order (repeatable), e.g. prune:sparsity=0.5,scope=layer or int8")
    p.add_argument("--out", help="save the compressed model into this folder (vk.save)")
    p.add_argument("--data", help="labelled images (an image folder or `digits`) for top-1 before and after")
    p.add_argument("--limit", type=int, default=1000, help="evaluate on about this many images, evenly per "
                   "class (0: all; default 1000)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency / throughput / memory measurement")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", help="also write the row as JSON to this file")
    p.set_defaults(func=_run_compress)
