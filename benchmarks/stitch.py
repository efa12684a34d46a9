"""Stitching (SN-Netv2) on real data: the embedded model and the shamail CIFAR-10 ViT joined into one model.

Anchors: a = vitkit's embedded `vitkit/vit-tiny-cifar` (trained on the first 800 CIFAR-10 test JPEGs of each
class), b = shamail-123/VisionTriad-CIFAR10 (trained by its authors on the CIFAR-10 train set); both 128 wide,
6 blocks, patch 4, mean = std = 0.5. Routes: both directions, exit block j = i ± `--window` (so a route runs
between 1 + 1 and 5 + 5 blocks: FLOPs differ by route). Calibration: `--calibration` images of the training part.
Data: `vk.data.split(seed=None, train=800, test=--test)` of the CIFAR-10 test JPEGs: the stitching layers train
on `--train` images of each class from the first 800, every route is measured on the last `--test` of each class
(unseen by both anchors). Training: `vk.fit` on the stitched model (only the stitching layers train; a route is
drawn per batch by FLOPs-aware sampling), rank `--rank`, lr 1e-3, `--epochs`, per seed.

Prints, per route: FLOPs, top-1 with least squares only, and top-1 after training (mean ± std over seeds); writes
benchmarks/results/stitch.json and docs/img/stitch_pareto.png.

    OMP_NUM_THREADS=2 python benchmarks/stitch.py
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=300, help="stitch-training images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class (the last of each class)")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stitch.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "stitch_pareto.png"))
    args = p.parse_args()
    start = time.time()
    a = vk.load("vitkit/vit-tiny-cifar")
    b = vk.load(SHAMAIL, num_heads=4, mean=0.5, std=0.5)
    dataset = vk.data.image_folder(DATA, preload=True)
    parts = vk.data.split(dataset, seed=None, train=800, test=args.test)
    train_all = parts["train"]
    per_class = {}
    for index, label in enumerate(train_all.targets if hasattr(train_all, "targets") else [y for _, y in train_all]):
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
            vk.fit(stitched, train, epochs=args.epochs, lr=1e-3, batch_size=64, seed=seed, out_dir=run,
                   progress=False)
        results.setdefault("trained", []).append(stitched.pareto(test))

    flops = {r["route"]: r["flops"] for r in results["least_squares"]}
    ls = {r["route"]: r["top1"] for r in results["least_squares"]}
    trained = {}
    for rows in results["trained"]:
        for r in rows:
            trained.setdefault(r["route"], []).append(r["top1"])
    print(f"| route | MFLOPs | top-1 least squares | top-1 trained ({len(args.seeds)} seeds) |")
    print("|---|---:|---:|---:|")
    summary = []
    for route in sorted(flops, key=lambda k: (flops[k], k)):
        vals = trained[route]
        mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        name = {"a": "anchor a (embedded)", "b": "anchor b (shamail)"}.get(route, route)
        print(f"| {name} | {flops[route] / 1e6:.1f} | {ls[route]:.3f} | {mean:.3f} ± {std:.3f} |")
        summary.append({"route": route, "flops": flops[route], "top1": mean, "top1_std": std,
                        "top1_least_squares": ls[route]})
    stitched_rows = [r for r in summary if r["route"] not in ("a", "b")]
    print(f"stitched routes: {len(stitched_rows)}; least squares only: mean top-1 "
          f"{statistics.mean(r['top1_least_squares'] for r in stitched_rows):.3f} (chance 0.100); trained: mean "
          f"{statistics.mean(r['top1'] for r in stitched_rows):.3f}; anchors a {ls['a']:.3f}, b {ls['b']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": summary},
                                         indent=1))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_pareto(summary, args.plot, title="embedded (a) + shamail (b), CIFAR-10 JPEGs")
    print(f"wrote {args.out} and {args.plot} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
