"""Domain shift, measured: continued self-supervised pre-training of the embedded CIFAR ViT on unlabelled digits.

The embedded model (`vitkit/vit-tiny-cifar`, trained on CIFAR-10) is continued-pretrained with `vk.pretrain`
on unlabelled sklearn digits (8x8, upscaled to 32x32 by `vk.data.transform`), then measured on that domain with
`vk.evaluate`'s k-NN and linear-probe protocols at the same labelled budget as the untouched model. The same runs
from a random initialisation (same architecture) stand beside it. Per seed: a stratified split of digits (seeded)
into `unlabelled` (pre-training images, labels unused), `train` (the labelled budget: probe fit / k-NN memory)
and `test`; the pre-training seed is the same seed.

    python benchmarks/pretrain.py                              # the RESULTS.md table (2-core CPU: ~30 min)
    python benchmarks/pretrain.py --objectives mae --seeds 1 --epochs 2     # a quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import torch

import vitkit as vk
from vitkit import data


def measure(model, parts) -> dict:
    """k-NN and linear-probe top-1, and `cos`: the mean cosine similarity between the test images' features (the
    features' common direction: k-NN compares raw cosines, the linear probe standardised features)."""
    from vitkit.train.evaluate import features

    tf = data.transform(model)
    train, test = parts["train"].with_transform(tf), parts["test"].with_transform(tf)
    out = {p: vk.evaluate(model, test, p, train=train)["top1"] for p in ("knn", "linear")}
    f = torch.nn.functional.normalize(features(model, test)[0], dim=1)
    out["cos"] = float(((f.sum(0) @ f.sum(0)) - len(f)) / (len(f) * (len(f) - 1)))
    return out


def fresh(init: str, seed: int):
    model = vk.load("vitkit/vit-tiny-cifar")
    if init == "random":
        torch.manual_seed(seed)
        model.init_weights()  # timm's own initialisation of every weight and the position embedding
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=["mae", "dino"])
    ap.add_argument("--inits", nargs="+", default=["pretrained", "random"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unlabelled", type=int, default=100, help="unlabelled pre-training images per class")
    ap.add_argument("--labelled", type=int, default=20, help="labelled images per class (probe / k-NN budget)")
    ap.add_argument("--test", type=int, default=50, help="test images per class")
    ap.add_argument("--set", action="append", default=[], metavar="OBJECTIVE:KEY=VALUE",
                    help="objective config override, e.g. dino:local_views=0 (repeatable)")
    ap.add_argument("--json", help="also write every measurement to this JSON file")
    args = ap.parse_args()
    logging.getLogger("vitkit").setLevel(logging.WARNING)
    from vitkit.cli import parse_pairs

    overrides: dict[str, dict] = {}
    for item in args.set:
        name, _, pair = item.partition(":")
        overrides.setdefault(name, {}).update(parse_pairs([pair]))
    digits = data.digits()
    rows: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        parts = data.split(digits, seed=seed, unlabelled=args.unlabelled, train=args.labelled, test=args.test)
        for init in args.inits:
            rows.setdefault((init, "untouched"), []).append(measure(fresh(init, seed), parts))
            for objective in args.objectives:
                model = fresh(init, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    vk.pretrain(model, parts["unlabelled"], objective, epochs=args.epochs, batch_size=args.batch_size,
                                seed=seed, out_dir=tmp, progress=False, **overrides.get(objective, {}))
                    last = model.__dict__["_vitkit_pretrain"]["history"][-1]
                r = measure(model, parts)
                r.update(minutes=(time.perf_counter() - t) / 60, loss=last["train_loss"],
                         **{k: v for k, v in last.items() if k.startswith("teacher")})
                rows.setdefault((init, objective), []).append(r)
                monitor = "".join(f" {k} {v:.3f}" for k, v in r.items() if k.startswith("teacher"))
                print(f"seed {seed} {init:10s} {objective:5s} knn {r['knn']:.4f} linear {r['linear']:.4f} "
                      f"cos {r['cos']:.3f} loss {r['loss']:.4f}{monitor} ({r['minutes']:.1f} min)", flush=True)
            u = rows[(init, "untouched")][-1]
            print(f"seed {seed} {init:10s} untouched knn {u['knn']:.4f} linear {u['linear']:.4f} cos {u['cos']:.3f}",
                  flush=True)

    def ms(values) -> str:
        return f"{np.mean(values):.4f} ± {np.std(values):.4f}"

    print(f"\nsklearn digits (32x32 upscaled): {args.unlabelled} unlabelled / {args.labelled} labelled / "
          f"{args.test} test images per class; seeds {args.first_seed}-{args.first_seed + args.seeds - 1} (split + pre-training seed); {args.epochs} epochs, batch "
          f"{args.batch_size}; overrides {overrides or 'none'}; {(time.perf_counter() - t0) / 60:.1f} min in all\n")
    print("| init | objective | k-NN top-1 (mean ± std) | linear-probe top-1 (mean ± std) | Δ k-NN | Δ linear | "
          "feature cos |")
    print("|---|---|---|---|---|---|---|")
    for (init, objective), rs in rows.items():
        base = rows[(init, "untouched")]
        dk = [r["knn"] - b["knn"] for r, b in zip(rs, base)]
        dl = [r["linear"] - b["linear"] for r, b in zip(rs, base)]
        delta = ("", "") if objective == "untouched" else (ms(dk), ms(dl))
        print(f"| {init} | {objective} | {ms([r['knn'] for r in rs])} | {ms([r['linear'] for r in rs])} | "
              f"{delta[0]} | {delta[1]} | {np.mean([r['cos'] for r in rs]):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{i}/{o}": rs for (i, o), rs in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
