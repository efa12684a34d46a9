"""Volume segmentation by patch similarity (neural transfer functions, spec E6): Dice vs number of clicks.

    python benchmarks/volume_segmentation.py [--size 48] [--patches 16] [--seeds 3] [--img-dir docs/img]

A procedural 48³ volume with exact labels: a smooth-noise background (mean 0.45) holding three objects told apart
by texture more than by intensity: a sphere of fine white noise around 0.7, an ellipsoid striped along axis 0
around the background's mean intensity, and a dark box of coarse blobs. For each object, `n` clicks drawn at
random inside it (eroded by 2 voxels; `seeds` draws), the similarity volume of `vk.segment_volume`'s pipeline
(keys of the last block, floor 0.25, power 2.5, mean over clicks) and the Dice of its mask with the object at
τ = 0.5 and at the best τ of 0.05..0.95. Models: vitkit's embedded CIFAR-10 ViT vs the same architecture at
random init (3 seeds). The feature volume is built once per model; clicks only resample it.
Writes docs/img/explain_volume_dice.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import vitkit as vk
from vitkit.explain import volume_algo as algo
from vitkit.explain.volume import volume_features

CLICKS = (1, 2, 4, 8)
TAUS = np.round(np.arange(0.05, 0.96, 0.05), 2)
NAMES = ("sphere, fine noise", "ellipsoid, stripes", "box, coarse blobs")


def procedural(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, n, n) float volume and int labels (0 background, 1..3 objects)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n] / n
    vol = 0.45 + 0.6 * ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 4)
    labels = np.zeros((n, n, n), np.int64)
    labels[(z - 0.3) ** 2 + (y - 0.3) ** 2 + (x - 0.3) ** 2 < 0.2 ** 2] = 1
    labels[((z - 0.68) / 0.22) ** 2 + ((y - 0.62) / 0.16) ** 2 + ((x - 0.38) / 0.14) ** 2 < 1] = 2
    labels[(z > 0.6) & (z < 0.9) & (y > 0.15) & (y < 0.42) & (x > 0.62) & (x < 0.9)] = 3
    fine = 0.7 + 0.12 * rng.standard_normal((n, n, n))
    stripes = 0.45 + 0.25 * np.sin(2 * np.pi * z * n / 4)
    blobs = 0.15 + 0.5 * ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.5)
    for k, tex in enumerate((fine, stripes, blobs), start=1):
        vol[labels == k] = tex[labels == k]
    return vol.astype(np.float32), labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def scores(feats: torch.Tensor, labels: np.ndarray, seeds: int, reduce: str = "mean") -> dict:
    """{(object, clicks): (dice at 0.5, best dice)} averaged over `seeds` click draws."""
    out = {}
    for k in (1, 2, 3):
        inside = np.argwhere(ndimage.binary_erosion(labels == k, iterations=2))
        for n in CLICKS:
            at, best = [], []
            for s in range(seeds):
                rng = np.random.default_rng(1000 * k + 10 * n + s)
                clicks = [tuple(v) for v in inside[rng.choice(len(inside), n, replace=False)]]
                grid = algo.click_similarity(feats, clicks, labels.shape, 0.25, 2.5, reduce)
                sim = algo.upsample(grid, labels.shape).clamp(0, 1).numpy()
                d = [dice(sim >= t, labels == k) for t in TAUS]
                at.append(d[int(np.argmin(np.abs(TAUS - 0.5)))])
                best.append(max(d))
            out[k, n] = (float(np.mean(at)), float(np.mean(best)))
    return out


def twin(seed: int):
    torch.manual_seed(seed)
    return vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=128, depth=6,
                   num_heads=4, mlp_ratio=2.0, num_classes=10, dynamic_img_size=True).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--patches", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="click draws per (object, clicks)")
    p.add_argument("--img-dir", default="docs/img")
    args = p.parse_args()
    torch.manual_seed(0)
    vol, labels = procedural(args.size)
    v = algo.normalise(torch.from_numpy(vol))
    models = {"embedded (trained)": vk.load("vitkit/vit-tiny-cifar", dynamic_img_size=True).eval()}
    models.update({f"random twin, seed {s}": twin(s) for s in range(3)})
    print(f"volume {args.size}^3, patches {args.patches} (grid {algo.feature_grid(vol.shape, args.patches)}), "
          f"objects: {', '.join(f'{n} {int((labels == k).sum())} voxels' for k, n in enumerate(NAMES, 1))}")
    results, maxed = {}, {}
    for name, model in models.items():
        t = time.perf_counter()
        feats = volume_features(model, v, args.patches, mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)
        results[name] = scores(feats, labels, args.seeds)
        maxed[name] = scores(feats, labels, args.seeds, "max")
        print(f"{name}: feature volume {tuple(feats.shape)} in {time.perf_counter() - t:.1f} s")
    print("\n| model | object | " + " | ".join(f"Dice@0.5, {n} click{'s' * (n > 1)}" for n in CLICKS)
          + " | best-τ Dice, 8 clicks |")
    print("|---|---|" + "---|" * (len(CLICKS) + 1))
    for name, r in results.items():
        for k, obj in enumerate(NAMES, 1):
            print(f"| {name} | {obj} | " + " | ".join(f"{r[k, n][0]:.3f}" for n in CLICKS) + f" | {r[k, 8][1]:.3f} |")
    for reduce, res in (("mean", results), ("max", maxed)):
        print(f"\nmean over the three objects, clicks reduced by {reduce} (clicks: Dice at τ = 0.5 / best τ):")
        for name, r in res.items():
            print(f"  {name}: " + "  ".join(f"{n}: {np.mean([r[k, n][0] for k in (1, 2, 3)]):.3f}"
                                            f"/{np.mean([r[k, n][1] for k in (1, 2, 3)]):.3f}" for n in CLICKS))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, r in results.items():
        style = dict(color="C0", lw=2) if "trained" in name else dict(color="grey", lw=1, alpha=0.7)
        for ax, j in zip(axes, (0, 1)):
            ax.plot(CLICKS, [np.mean([r[k, n][j] for k in (1, 2, 3)]) for n in CLICKS], "o-", label=name, **style)
    for ax, title in zip(axes, ("Dice at τ = 0.5", "Dice at the best τ")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CLICKS, [str(n) for n in CLICKS])
        ax.set_xlabel("clicks per object")
        ax.set_title(title + " (mean of 3 objects)")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.img_dir) / "explain_volume_dice.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
