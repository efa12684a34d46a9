"""Every registered `adapt` method on one task, at its Config's default learning rate, over several seeds.

The task: vitkit's embedded CIFAR ViT (`vitkit/vit-tiny-cifar`, 0.81 M parameters, 32 px) with a fresh 10-class
head, adapted to scikit-learn's digits (1,797 8x8 images, shuffled with seed 0, upsampled to 32x32, 3 channels,
mean = std = 0.5): 1,000 training and 500 held-out images (`--train`, `--test`), `vk.fit` (AdamW, cosine, no
warmup, batch 50) with each method's own lr and weight decay (its Config). Methods come from the registry, so every method a later branch
registers appears here. Methods that need other data (a source task, a retrieval split) are skipped with the reason.

    OMP_NUM_THREADS=1 nice python benchmarks/adapt_compare.py --epochs 3 --seeds 3

Prints one Markdown row per method: held-out top-1 mean ± std (population std over seeds), trainable parameters
(with the head), the lr used and where it came from, and the mean training time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import vitkit as vk
from vitkit.data.datasets import digits_tensors

# Methods that cannot be compared on this task as they are, and why (a method absent from the registry is ignored).
SKIP = {
    "dml-proxies": "metric learning: trained and measured by retrieval on held-out classes, not classification",
    "pvp": "a recipe: needs prompts pre-trained on a source task first",
}


def run(name: str, seed: int, epochs: int, train, test) -> dict:
    from vitkit.train.hparams import default_hparams

    model = vk.load("vitkit/vit-tiny-cifar")
    torch.manual_seed(seed)
    model.reset_classifier(10)
    vk.adapt(model, name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = default_hparams(model)["lr"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        vk.fit(model, train, epochs=epochs, batch_size=50, warmup_epochs=0, seed=seed, out_dir=out, progress=False,
               save_model=False)
    seconds = time.perf_counter() - t0
    model.eval()
    x, y = test.tensors
    with torch.no_grad():
        acc = sum((model(x[i:i + 250]).argmax(-1) == y[i:i + 250]).sum().item() for i in range(0, len(y), 250))
    return {"acc": acc / len(y), "trainable": trainable, "lr": lr, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="held-out images")
    parser.add_argument("--methods", nargs="*", help="only these (default: every registered adapt method)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = digits_tensors(args.train, args.test)
    names = args.methods or [m.name for m in vk.methods("adapt")]
    print(f"embedded CIFAR ViT -> digits ({args.train:,} train / {args.test:,} held-out), {args.epochs} epochs, "
          f"batch 50, seeds 0..{args.seeds - 1}, each method's default lr; torch threads 1\n")
    print("| method | held-out top-1 (mean ± std) | trainable (with head) | lr (its Config) | train time / run |")
    print("|---|---|---|---|---|")
    for name in names:
        if name in SKIP:
            print(f"| {name} | skipped: {SKIP[name]} | | | |")
            continue
        takes = next((getattr(m.config, "INPUT", None) for m in vk.methods("adapt") if m.name == name), None)
        if takes:
            print(f"| {name} | skipped: an input adapter, takes {takes} (docs/applications.md) | | | |")
            continue
        try:
            rows = [run(name, seed, args.epochs, train, test) for seed in range(args.seeds)]
        except (ValueError, TypeError, NotImplementedError) as err:
            print(f"| {name} | skipped: {' '.join(str(err).split())} | | | |")
            continue
        accs = [r["acc"] for r in rows]
        print(f"| {name} | {statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f} | {rows[0]['trainable']:,} | "
              f"{rows[0]['lr']:g} | {statistics.mean(r['seconds'] for r in rows):.1f} s |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
