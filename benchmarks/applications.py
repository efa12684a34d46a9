"""Input adapters, measured: the embedded CIFAR ViT on spectrograms, multispectral tiles, clips and point clouds.

Every task here is **procedural** (generated with exact labels; no such data ships offline), and every model starts
from the embedded model `vitkit/vit-tiny-cifar` (trained on CIFAR-10 photos, 32x32, patch 4) or, where the question
is whether image pre-training transfers, from the same architecture randomly initialised. Per seed the data, the
split and the initialisation of new parts change. The generators are `vitkit/data/generators.py` (`vk.data.procedural`,
also `vitkit bench`'s tasks of these inputs).

* audio: 8 sound events (tone, up/down chirp, AM tone, harmonic stack, noise burst, click train, two tones; random
  pitch, onset, length, level, noise), 0.5 s at 8 kHz -> log-mel 32 x 64 (`spectrogram_algo.log_mel`); adapter
  `spectrogram` (1 channel, non-square 8 x 16 grid) + `full` fine-tuning, pretrained vs random init;
* tiles: 32 x 32 x 10-band tiles, Voronoi land cover of 4 classes with *the same* RGB statistics, told apart only by
  NIR / red-edge / SWIR, with roads and buildings drawn over it that RGB shows as well as all bands
  (`tile_scenes`); the library's dense head (`vk.adapt(model, "dense")`, linear per patch on the tokens of
  `--blocks`) on the frozen backbone with a trained patch embedding, `channels` (all 10 bands) vs the RGB model on
  B04 B03 B02, n = 8 / 32 / 128 training tiles: land-cover mIoU and road / building density MSE per patch;
* video: 4-frame clips of a digit moving 3 px/frame in one of 8 directions; `video` (tubelets of 2 frames) +
  `full` vs the 2-D model on the frame average (which shows the axis of motion, not its sign); `video-mae`: the
  same fine-tuning with and without tube-masked pre-training on 320 unlabelled clips first;
* points: 256-point clouds of 8 primitives under random rotation, scale and jitter; `points` (tokenizer and head
  train, backbone frozen) with projected 2-D position embedding vs a learned 3-D one; `points-adapters`: the same on
  `--n-points` (1,024) point clouds, 64 groups of 32, each position kind with and without Any2Point's guided local
  adapters (`adapters=True`, trained with the tokenizer and head).

    python benchmarks/applications.py --tasks audio        # one task of the RESULTS.md table (one process each)
    python benchmarks/applications.py --tasks audio --seeds 1 --epochs 3    # a quick look
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time

import numpy as np
import torch

import vitkit as vk
from vitkit.data.generators import clips, pairs, points, sounds, tile_scenes

EMBEDDED = "vitkit/vit-tiny-cifar"


def fresh(init: str = "pretrained", seed: int = 0, num_classes: int = 10):
    model = vk.load(EMBEDDED, num_classes=num_classes)
    if init == "random":
        torch.manual_seed(seed)
        model.init_weights()
    return model


def fit_eval(model, train, test, epochs: int, lr: float, seed: int, batch_size: int = 32) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        vk.fit(model, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, out_dir=tmp, progress=False,
               save_model=False)
    return vk.evaluate(model.eval(), test, "finetuned")["top1"]


def note(rows: dict, name: str, seed: int, value: float) -> None:
    """Record one measurement and print it at once (a long run interrupted keeps what it measured)."""
    rows.setdefault(name, []).append(value)
    print(f"    seed {seed}: {name}: {fmt(name, value)}", flush=True)


def fmt(name: str, value: float) -> str:
    return f"{value:.4f}" if "MSE" in name else f"{value:.3f}"  # densities' MSE is small


def split(x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int):
    """First `n_train` of each class (after a seeded shuffle) for training, the rest for testing."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    train = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        train[(y == c).nonzero()[:n_train, 0]] = True
    return vk.data.tensors(x[train], y[train]), vk.data.tensors(x[~train], y[~train])


# ------------------------------------------------------------------------------------------------------- audio

def run_audio(seeds, epochs):
    rows = {}
    for seed in seeds:
        x, y = sounds(40, seed)
        train, test = split(x, y, 20, seed)
        for init in ("pretrained", "random"):
            model = fresh(init, seed, num_classes=8)
            vk.adapt(model, "spectrogram", img_size=(32, 64))
            vk.adapt(model, "full")
            note(rows, f"spectrogram + full, {init} init", seed, fit_eval(model, train, test, epochs, 1e-3, seed))
    return rows


# ------------------------------------------------------------------------------------------------------- tiles

def dense_run(task: str, bands: tuple, train, test, seed: int, steps: int, blocks: tuple) -> float:
    """The library's dense head (`vk.adapt(model, "dense")`) on the frozen embedded ViT with a trained `channels`
    patch embedding, `steps` optimizer steps of vk.fit; mIoU (segment) or MSE (regress) on `test`."""
    torch.manual_seed(seed)
    model = fresh()
    vk.adapt(model, "channels", bands=bands, rgb=("B04", "B03", "B02"), train_head=False)
    vk.adapt(model, "dense", task=task, outputs=4 if task == "segment" else 2, blocks=blocks)
    batch = min(16, len(train))
    epochs = max(1, round(steps / math.ceil(len(train) / batch)))
    with tempfile.TemporaryDirectory() as tmp:
        vk.fit(model, train, epochs=epochs, batch_size=batch, seed=seed, out_dir=tmp, progress=False, save_model=False)
    result = vk.evaluate(model, test, protocol="dense")
    return result["miou"] if task == "segment" else result["mse"]


def run_tiles(seeds, steps, blocks, shots=(8, 32, 128)):
    """Land cover (mIoU) and road + building density (MSE) at n = 8 / 32 / 128 training tiles, all bands vs RGB."""
    from torch.utils.data import TensorDataset

    from vitkit.adapt.channels import SENTINEL2

    views = (("all 10 bands (channels)", SENTINEL2, list(range(10))),
             ("RGB only", ("B02", "B03", "B04"), [SENTINEL2.index(b) for b in ("B02", "B03", "B04")]))
    rows = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        test_x, test_cover, test_density = tile_scenes(64, rng)
        pool_x, pool_cover, pool_density = tile_scenes(max(shots), rng)
        for n in shots:
            mean = pool_density[:n].mean((0, 2, 3))[None, :, None, None]  # the training tiles' mean density
            note(rows, f"density MSE, predicting the training mean, n={n}", seed,
                 ((test_density - mean) ** 2).mean().item())
            for name, bands, cols in views:
                for task, what, targets, test_targets in (("segment", "land-cover mIoU", pool_cover, test_cover),
                                                          ("regress", "density MSE", pool_density, test_density)):
                    score = dense_run(task, bands, TensorDataset(pool_x[:n, cols], targets[:n]),
                                      TensorDataset(test_x[:, cols], test_targets), seed, steps, blocks)
                    note(rows, f"{what}, {name}, n={n}", seed, score)
    return rows


# ------------------------------------------------------------------------------------------------------- video

def run_video(seeds, epochs):
    rows = {}
    for seed in seeds:
        x, y = clips(40, seed)
        train, test = split(x, y, 20, seed)
        model = fresh(num_classes=8)
        vk.adapt(model, "video", num_frames=4, tubelet=2)
        vk.adapt(model, "full")
        note(rows, "video (tubelets t=2) + full", seed, fit_eval(model, train, test, epochs, 1e-3, seed))
        avg_train = vk.data.tensors(train.samples.mean(2), train.targets)
        avg_test = vk.data.tensors(test.samples.mean(2), test.targets)
        model = fresh(num_classes=8)
        vk.adapt(model, "full")
        note(rows, "2-D model on the frame average + full", seed, fit_eval(model, avg_train, avg_test, epochs, 1e-3,
                                                                           seed))
    return rows


def run_paired(seeds, epochs):
    rows = {}
    for seed in seeds:
        x, y = pairs(40, seed)
        train, test = split(x, y, 20, seed)
        for mode in ("early", "tokens"):
            model = fresh(num_classes=4)
            vk.adapt(model, "paired", mode=mode)
            vk.adapt(model, "full")
            note(rows, f"paired ({mode}) + full", seed, fit_eval(model, train, test, epochs, 1e-3, seed))
        first_train = vk.data.tensors(train.samples[:, :3], train.targets)
        first_test = vk.data.tensors(test.samples[:, :3], test.targets)
        model = fresh(num_classes=4)
        vk.adapt(model, "full")
        note(rows, "2-D model on the first image only + full", seed, fit_eval(model, first_train, first_test, epochs,
                                                                             1e-3, seed))
    return rows


def run_video_mae(seeds, epochs, pretrain_epochs: int = 3):
    """`video` + `full` fine-tuned as in `run_video`, with and without `video-mae` on 320 unlabelled clips first."""
    rows = {}
    for seed in seeds:
        x, y = clips(40, seed)
        train, test = split(x, y, 20, seed)
        pool, _ = clips(40, 1000 + seed)  # unlabelled: other digits, positions, directions
        for pretrain in (False, True):
            torch.manual_seed(seed)
            model = fresh(num_classes=8)
            vk.adapt(model, "video", num_frames=4, tubelet=2)
            vk.adapt(model, "full")
            if pretrain:
                with tempfile.TemporaryDirectory() as tmp:
                    vk.pretrain(model, vk.data.tensors(pool, [0] * len(pool)), objective="video-mae",
                                epochs=pretrain_epochs, batch_size=32, seed=seed, out_dir=tmp, progress=False)
            name = f"video + full{', after video-mae' if pretrain else ''}"
            note(rows, name, seed, fit_eval(model, train, test, epochs, 1e-3, seed))
    return rows


# ------------------------------------------------------------------------------------------------------ points

def run_points(seeds, epochs):
    rows, fraction = {}, {}
    for seed in seeds:
        x, y = points(40, seed)
        train, test = split(x, y, 20, seed)
        for position in ("projection", "learned"):
            torch.manual_seed(seed)
            model = fresh(num_classes=8)
            vk.adapt(model, "points", num_groups=32, group_size=16, position=position)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            fraction[position] = n_train / sum(p.numel() for p in model.parameters())
            note(rows, f"points, {position} position embedding", seed, fit_eval(model, train, test, epochs, 1e-3, seed))
    return rows, fraction


def run_points_adapters(seeds, epochs, n_points, positions=("projection", "learned")):
    rows, fraction = {}, {}
    for seed in seeds:
        x, y = points(40, seed, n_points=n_points)
        train, test = split(x, y, 20, seed)
        for adapters in (False, True):
            for position in positions:
                torch.manual_seed(seed)
                model = fresh(num_classes=8)
                vk.adapt(model, "points", num_groups=64, group_size=32, position=position, adapters=adapters)
                name = f"{position} positions, {'guided adapters' if adapters else 'no adapters'}"
                n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                fraction[name] = n_train / sum(p.numel() for p in model.parameters())
                note(rows, name, seed, fit_eval(model, train, test, epochs, 1e-3, seed))
    return rows, fraction


def report(title: str, rows: dict) -> None:
    print(f"\n{title}")
    for name, values in rows.items():
        runs = " ".join(fmt(name, v) for v in values)
        print(f"  {name}: {fmt(name, np.mean(values))} ± {fmt(name, np.std(values))}  (seeds: {runs})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["audio", "tiles", "video", "points"],
                    choices=["audio", "tiles", "video", "video-mae", "points", "points-adapters", "paired"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the audio, video and points runs")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each dense (tiles) run")
    ap.add_argument("--blocks", type=int, nargs="+", default=[-1], help="the blocks the dense (tiles) head reads")
    ap.add_argument("--n-points", type=int, default=1024, help="points per cloud of the points-adapters runs")
    ap.add_argument("--positions", nargs="+", default=["projection", "learned"], choices=["projection", "learned"],
                    help="position embeddings of the points-adapters runs")
    args = ap.parse_args()
    logging.getLogger("vitkit").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    for task in args.tasks:
        start = time.time()
        if task == "audio":
            report("audio events (procedural), 8 classes, 20 train / 20 test per class: top-1",
                   run_audio(seeds, args.epochs))
        elif task == "tiles":
            report(f"multispectral tiles (procedural), dense head on blocks {args.blocks}: land-cover mIoU (4 classes) "
                   "and road + building density MSE per patch on 64 tiles",
                   run_tiles(seeds, args.steps, tuple(args.blocks)))
        elif task == "video":
            report("moving digits (procedural), 8 directions, 20 train / 20 test per class: top-1",
                   run_video(seeds, args.epochs))
        elif task == "video-mae":
            report("moving digits (procedural), 8 directions, 20 train / 20 test per class, video-mae on 320 "
                   "unlabelled clips (3 epochs) or none: top-1", run_video_mae(seeds, args.epochs))
        elif task == "paired":
            report("image pairs (procedural), which way the digit moved (4 classes), 20 train / 20 test per class: "
                   "top-1", run_paired(seeds, args.epochs))
        elif task == "points":
            rows, fraction = run_points(seeds, args.epochs)
            report("point-cloud primitives (procedural), 8 classes, 20 train / 20 test per class: top-1", rows)
            print("  trainable fraction: " + ", ".join(f"{k} {v:.1%}" for k, v in fraction.items()))
        elif task == "points-adapters":
            rows, fraction = run_points_adapters(seeds, args.epochs, args.n_points, args.positions)
            report(f"point-cloud primitives (procedural), {args.n_points} points, 8 classes, 20 train / 20 test per "
                   f"class, backbone frozen, {args.epochs} epochs: top-1", rows)
            print("  trainable fraction: " + ", ".join(f"{k} {v:.1%}" for k, v in fraction.items()))
        print(f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
