"""ExPLoRA's phase 1 under a domain shift: does continued MAE pre-training with ExPLoRA's trainable set (last block,
every norm, q/v LoRA elsewhere) on unlabelled target-domain images improve the frozen features there?

Target domain: colour-inverted scikit-learn digits (`vitkit bench`'s `invert` variant: white background), far from
the embedded model's CIFAR pre-training. Per seed, the digits are split per class into `--unlabelled` images
(phase 1, labels ignored), `--probe` labelled images (the probes' training set) and `--test` images, all inverted.
Arms, all from the embedded CIFAR ViT (`vitkit/vit-tiny-cifar`):
* `untouched`: no phase 1;
* `explora`: `vk.adapt(model, "explora", rank=--rank)` (last block, every norm), `vk.pretrain(..., objective="mae")`,
  `explora.merge`;
* `full mae`: the same `vk.pretrain` on the whole backbone (at MAE's `backbone_lr`), the reference the paper beats.
Measured: linear-probe and k-NN top-1 of the frozen features (`vk.evaluate`), mean ± std (population) over seeds.

    OMP_NUM_THREADS=1 nice python benchmarks/explora_shift.py --seeds 2 --epochs 5 --rank 8
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import vitkit as vk
from vitkit.adapt import explora
from vitkit.bench.ood import OODDataset


def arm(name: str, seed: int, epochs: int, parts: dict, rank: int) -> dict:
    model = vk.load("vitkit/vit-tiny-cifar")
    t0 = time.perf_counter()
    if name != "untouched":
        if name == "explora":
            vk.adapt(model, "explora", rank=rank)
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head"))
        with tempfile.TemporaryDirectory() as out:
            vk.pretrain(model, parts["unlabelled"], "mae", epochs=epochs, batch_size=50, seed=seed, out_dir=out,
                        progress=False)
        if name == "explora":
            explora.merge(model)
    else:
        trainable = 0
    seconds = time.perf_counter() - t0
    tf = vk.data.transform(model)
    probe, test = parts["probe"].with_transform(tf), parts["test"].with_transform(tf)
    linear = vk.evaluate(model, test, protocol="linear", train=probe)["top1"]
    knn = vk.evaluate(model, test, protocol="knn", train=probe)["top1"]
    return {"linear": linear, "knn": knn, "trainable": trainable, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="phase-1 epochs")
    parser.add_argument("--unlabelled", type=int, default=50, help="phase-1 images per class")
    parser.add_argument("--probe", type=int, default=20, help="labelled probe images per class")
    parser.add_argument("--test", type=int, default=50, help="test images per class")
    parser.add_argument("--rank", type=int, default=8, help="explora's LoRA rank (its default 64 is half the "
                        "embedded model's width; 8 keeps phase 1 at about a fifth of the backbone)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        split = vk.data.split(vk.data.digits(), seed=seed, unlabelled=args.unlabelled, probe=args.probe,
                              test=args.test)
        parts = {k: OODDataset(v, "invert", seed=seed) for k, v in split.items()}
        for name in ("untouched", "explora", "full mae"):
            results.setdefault(name, []).append(arm(name, seed, args.epochs, parts, args.rank))
    print(f"embedded CIFAR ViT, target domain: inverted digits; phase 1: MAE, {args.epochs} epochs on "
          f"{args.unlabelled}/class unlabelled; probes: {args.probe}/class labelled, {args.test}/class test; "
          f"seeds 0..{args.seeds - 1}\n")
    print("| arm | trainable in phase 1 | linear-probe top-1 | k-NN top-1 | phase-1 time |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        stats = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
                 for k in ("linear", "knn")}
        print(f"| {name} | {rows[0]['trainable']:,} | {stats['linear'][0]:.4f} ± {stats['linear'][1]:.4f} | "
              f"{stats['knn'][0]:.4f} ± {stats['knn'][1]:.4f} | {statistics.mean(r['seconds'] for r in rows):.0f} s |")


if __name__ == "__main__":
    main()
