"""Stitching (SN-Netv2) on real data: the embedded model joined with a second CIFAR-10 ViT into one model.

Anchors (`--anchors`): a = vitkit's embedded `vitkit/vit-tiny-cifar` (trained on the first 800 CIFAR-10 test JPEGs
of each class; 128 wide, 6 blocks, patch 4, mean = std = 0.5) and b =
* `shamail` (default): shamail-123/VisionTriad-CIFAR10 (trained by its authors on the CIFAR-10 train set), the
  same shape as a: routes differ in FLOPs only by the blocks they skip or repeat;
* `narrow`: a 64-wide ViT of the same shape otherwise (6 blocks, 2 heads of 32, MLP ratio 2; 0.21 M parameters,
  32 instead of 116 MFLOPs), trained by this script with the embedded model's recipe cut to 20 epochs (`vk.fit`,
  lr 1e-3, batch 128, weight decay 0.05, 3 warmup epochs, label smoothing 0.1, RandomResizedCrop scale (0.35, 1),
  seed 0) on the same 800 images per class; cached and resumable in `--cache` (a finished cache is loaded, an
  interrupted one continues). Routes then span the FLOPs between the two widths.
Routes: both directions, exit block j = i ± `--window`. Calibration: `--calibration` images of the training part.
Data: `vk.data.split(seed=None, train=800, test=--test)` of the CIFAR-10 test JPEGs: the stitching layers train
on `--train` images of each class from the first 800, every route is measured on the last `--test` of each class
(unseen by both anchors). Training: `vk.fit` on the stitched model (only the stitching layers train; a route is
drawn per batch by FLOPs-aware sampling), rank `--rank`, lr `--lr`, `--epochs`, per seed.

Prints, per route: FLOPs, top-1 with least squares only, and top-1 after training (mean ± std over seeds); writes
benchmarks/results/stitch.json and docs/img/stitch_pareto.png (`--anchors narrow`: stitch_narrow.json and
stitch_pareto_narrow.png); with `narrow`, also how far each route between the anchors' FLOPs lies from the straight
line joining the anchors (the SN-Netv2 claim: routes fill that gap).

    OMP_NUM_THREADS=2 python benchmarks/stitch.py
    OMP_NUM_THREADS=2 python benchmarks/stitch.py --anchors narrow --window 0 --train 500 --test 200 --lr 1e-2
    OMP_NUM_THREADS=2 python benchmarks/stitch.py --anchors narrow --window 0 --train 800 --test 200 --lr 1e-2 --epochs 8
    OMP_NUM_THREADS=1 python benchmarks/stitch.py --train 10 --test 5 --epochs 1 --seeds 0   # smoke
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitkit as vk
from vitkit.models.stitch import plot_pareto

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
DATA = SHARED / "data" / "cifar10-test-jpeg" / "test"


NARROW = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2, mlp_ratio=2, num_classes=10)


def narrow_anchor(train_all, cache: Path, epochs: int) -> torch.nn.Module:
    """The 64-wide anchor, trained with the embedded model's recipe on `train_all` (800 per class) in `cache`:
    a finished run is only reloaded, an interrupted one continues, one with other settings is refused (vk.fit)."""
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, mean=0.5, std=0.5, **NARROW)
    data = train_all.with_transform(vk.data.transform(model, train=True, scale=(0.35, 1.0)))
    vk.fit(model, data, epochs=epochs, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_epochs=3,
           label_smoothing=0.1, clip_grad=1.0, seed=0, out_dir=cache, resume=True)
    return model.eval()


def anchor_line(flops: dict, top1: dict):
    """Top-1 on the straight line joining the anchors at a FLOPs value between theirs (None outside, or when the
    anchors cost the same)."""
    (f0, t0), (f1, t1) = sorted([(flops["a"], top1["a"]), (flops["b"], top1["b"])])
    return lambda f: t0 + (t1 - t0) * (f - f0) / (f1 - f0) if f0 < f < f1 else None


def pareto_front(rows: list[dict]) -> list[str]:
    """Routes no other route beats in both FLOPs (fewer or equal) and trained top-1 (higher), cheapest first."""
    return [r["route"] for r in rows
            if not any(o["flops"] <= r["flops"] and o["top1"] > r["top1"] for o in rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", choices=["shamail", "narrow"], default="shamail", help="anchor b (a: embedded)")
    p.add_argument("--train", type=int, default=300, help="stitch-training images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class (the last of each class)")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="lr of the stitching layers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--narrow-epochs", type=int, default=20, help="training epochs of the narrow anchor")
    p.add_argument("--cache", default=str(ROOT / "runs" / "stitch-narrow"), help="the narrow anchor's run folder")
    p.add_argument("--out", default=None, help="default: benchmarks/results/stitch[_narrow].json")
    p.add_argument("--plot", default=None, help="default: docs/img/stitch_pareto[_narrow].png")
    args = p.parse_args()
    suffix = "_narrow" if args.anchors == "narrow" else ""
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"stitch{suffix}.json")
    args.plot = args.plot or str(ROOT / "docs" / "img" / f"stitch_pareto{suffix}.png")
    start = time.time()
    a = vk.load("vitkit/vit-tiny-cifar")
    dataset = vk.data.image_folder(DATA, preload=True)
    parts = vk.data.split(dataset, seed=None, train=800, test=args.test)
    train_all = parts["train"]
    if args.anchors == "narrow":
        b = narrow_anchor(train_all, Path(args.cache), args.narrow_epochs)
        print(f"narrow anchor ready ({time.time() - start:.0f} s)")
    else:
        b = vk.load(SHAMAIL, num_heads=4, mean=0.5, std=0.5)
    per_class = {}
    for index, label in enumerate(train_all.targets):
        per_class.setdefault(int(label), []).append(index)
    keep = sorted(i for idx in per_class.values() for i in idx[:args.train])
    train = vk.data.Subset(train_all, keep).with_transform(vk.data.transform(a, train=True))
    test = parts["test"].with_transform(vk.data.transform(a))
    calibration = vk.data.Subset(train_all, keep).with_transform(vk.data.transform(a))

    results = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        order = torch.randperm(len(calibration))[:args.calibration].tolist()
        stitched = vk.stitch(a, b, vk.data.Subset(calibration, order), rank=args.rank, window=args.window,
                             calibration=args.calibration)
        if seed == args.seeds[0]:
            results["least_squares"] = stitched.pareto(test)
        with tempfile.TemporaryDirectory() as run:
            vk.fit(stitched, train, epochs=args.epochs, lr=args.lr, batch_size=64, seed=seed, out_dir=run,
                   progress=False)
        results.setdefault("trained", []).append(stitched.pareto(test))

    flops = {r["route"]: r["flops"] for r in results["least_squares"]}
    ls = {r["route"]: r["top1"] for r in results["least_squares"]}
    trained = {}
    for rows in results["trained"]:
        for r in rows:
            trained.setdefault(r["route"], []).append(r["top1"])
    line = anchor_line(flops, {k: statistics.mean(v) for k, v in trained.items()})
    print(f"| route | MFLOPs | top-1 least squares | top-1 trained ({len(args.seeds)} seeds) | trained - anchor line |")
    print("|---|---:|---:|---:|---:|")
    summary = []
    for route in sorted(flops, key=lambda k: (flops[k], k)):
        vals = trained[route]
        mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        name = {"a": "anchor a (embedded)", "b": f"anchor b ({args.anchors})"}.get(route, route)
        gap = mean - line(flops[route]) if route not in ("a", "b") and line(flops[route]) is not None else None
        print(f"| {name} | {flops[route] / 1e6:.1f} | {ls[route]:.3f} | {mean:.3f} ± {std:.3f} | "
              f"{'' if gap is None else f'{gap:+.3f}'} |")
        summary.append({"route": route, "flops": flops[route], "top1": mean, "top1_std": std,
                        "top1_least_squares": ls[route], "minus_line": gap})
    stitched_rows = [r for r in summary if r["route"] not in ("a", "b")]
    print(f"stitched routes: {len(stitched_rows)}; least squares only: mean top-1 "
          f"{statistics.mean(r['top1_least_squares'] for r in stitched_rows):.3f} (chance 0.100); trained: mean "
          f"{statistics.mean(r['top1'] for r in stitched_rows):.3f}; anchors a {ls['a']:.3f}, b {ls['b']:.3f}")
    between = [r for r in stitched_rows if r["minus_line"] is not None]
    if between:
        gaps = sorted(r["minus_line"] for r in between)
        front = pareto_front(summary)
        print(f"routes with FLOPs between the anchors: {len(between)}; trained top-1 minus the anchor line: median "
              f"{statistics.median(gaps):+.3f}, best {gaps[-1]:+.3f}, worst {gaps[0]:+.3f}; within 0.02 of the line "
              f"or above: {sum(g >= -0.02 for g in gaps)}; Pareto front: {', '.join(front)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": summary},
                                         indent=1))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_pareto(summary, args.plot, title=f"embedded (a) + {args.anchors} (b), CIFAR-10 JPEGs",
                names={"a": "embedded", "b": args.anchors})
    print(f"wrote {args.out} and {args.plot} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
