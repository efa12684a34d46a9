"""Does pretraining matter? The embedded model versus random-initialised twins of the same shape.

Frozen-feature protocols (vk.evaluate) on two tasks, measured in one run:
* CIFAR-10 JPEG evaluation split: the last 200 images per class (folder order), reference = the first 800
  per class (the embedded model's training images).
* scikit-learn digits (another domain): seeded stratified split, 50 train / 50 test per class.

    python benchmarks/embedded_model.py [--twins 3] [--out runs/bench-embedded]

Prints a Markdown table and writes it with the JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vitkit as vk
from vitkit.models.loading import build_vit

NAME = "vitkit/vit-tiny-cifar"
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-jpeg" / "test"


def tasks(model):
    tf = vk.data.transform(model)
    cifar = vk.data.split(vk.data.cifar10_jpeg(CIFAR), seed=None, train=800, test=200)
    digits = vk.data.split(vk.data.digits(), seed=0, train=50, test=50)
    return {name: (parts["train"].with_transform(tf), parts["test"].with_transform(tf))
            for name, parts in (("cifar10-jpeg", cifar), ("digits", digits))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--twins", type=int, default=3, help="random-init twins (seeds 0..n-1)")
    parser.add_argument("--out", default="runs/bench-embedded")
    args = parser.parse_args()
    pretrained = vk.load(NAME)
    models = {"embedded": pretrained}
    for seed in range(args.twins):
        torch.manual_seed(seed)
        models[f"random-{seed}"] = build_vit(pretrained.__dict__["_vitkit_base"]["model_args"])
    results, start = [], time.perf_counter()
    for task, (train, test) in tasks(pretrained).items():
        for name, model in models.items():
            for protocol in ("linear", "knn"):
                r = vk.evaluate(model, test, protocol, train=train)
                results.append({"task": task, "model": name, "protocol": protocol, "top1": r["top1"],
                                "top5": r["top5"], "n": r["n"]})
                print(f"{task:13s} {name:10s} {protocol:7s} top-1 {r['top1']:.4f}", flush=True)
    rows = ["| task | protocol | embedded | random twins (mean, n) | difference |", "|---|---|---|---|---|"]
    for task in ("cifar10-jpeg", "digits"):
        for protocol in ("linear", "knn"):
            pick = [r["top1"] for r in results if r["task"] == task and r["protocol"] == protocol]
            twins = pick[1:]
            mean = sum(twins) / len(twins)
            rows.append(f"| {task} | {protocol} | {pick[0]:.4f} | {mean:.4f} ({len(twins)}) | {pick[0] - mean:+.4f} |")
    table = "\n".join(rows)
    print(table)
    print(f"{time.perf_counter() - start:.0f} s, {torch.get_num_threads()} torch threads")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
