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
  same fine-tuning with and without tube-masked pre-training on 320 unlabelled clips first; `video-mae-pool`: top-1
  after 20 or 5 labelled clips per class vs the size of the unlabelled pool (320 / 1,280 / 5,120 clips, a fixed
  budget of 160 pre-training steps) and vs no pre-training, with k-NN on the frozen features and the pretext loss;
* points: 256-point clouds of 8 primitives under random rotation, scale and jitter; `points` (tokenizer and head
  train, backbone frozen) with projected 2-D position embedding vs a learned 3-D one; `points-adapters`: the same on
  `--n-points` (1,024) point clouds, 64 groups of 32, each position kind with and without Any2Point's guided local
  adapters (`adapters=True`, trained with the tokenizer and head).

    python benchmarks/applications.py --tasks audio        # one task of the RESULTS.md table (one process each)
    python benchmarks/applications.py --tasks audio --seeds 1 --epochs 3    # a quick look
    python benchmarks/applications.py --tasks video-mae-pool --jobs 3     # seeds side by side, one process each
    python benchmarks/applications.py --tasks video-mae-pool --jobs 3 --mae norm_pix_loss=false   # video-mae fields
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time

import numpy as np
import torch

import vitkit as vk
from vitkit.data.generators import clips, pairs, points, sounds, tile_scenes
from vitkit.pretrain.video_mae_algo import tubelets

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


POOLS = (320, 1280, 5120)


def pool_seed(seed: int, epochs: int, pools: tuple = POOLS, options: dict | None = None, steps: int = 160) -> dict:
    """One seed of `run_video_mae_pool`: the same `video` + `full` fine-tuning (20 and 5 labelled clips per class)
    after no pre-training or `video-mae` on nested pools of unlabelled clips, at a fixed budget of `steps`
    pre-training steps (batch 32) whatever the pool size, `options` its config (default: its own); also k-NN on
    the frozen features and the pretext loss."""
    torch.set_num_threads(1)
    logging.getLogger("vitkit").setLevel(logging.WARNING)
    rows = {}
    x, y = clips(60, seed)
    train20, test = split(x, y, 20, seed)  # 20 labelled clips per class; the same 40 per class tested for all arms
    first5 = [i for c in range(8) for i in [j for j, t in enumerate(train20.targets) if t == c][:5]]
    train5 = vk.data.tensors(train20.samples[first5], [train20.targets[i] for i in first5])
    unlabelled, _ = clips(max(pools) // 8, 1000 + seed)  # other digits, positions, directions than the labelled
    unlabelled = unlabelled[torch.randperm(len(unlabelled), generator=torch.Generator().manual_seed(seed))]
    targets = tubelets(unlabelled, 2, 4, 4)  # what a constant prediction scores (normalised targets: 0 on blanks)
    if (options or {}).get("norm_pix_loss", True):
        blank, what = (targets.var(-1) > 0).float().mean().item(), "predicting blank tubelets"
    else:
        blank, what = targets.var().item(), "predicting the mean pixel"
    print(f"    seed {seed}: pretext loss of {what}: {blank:.3f}", flush=True)
    for n in (0,) + tuple(pools):
        arm = "no pre-training" if n == 0 else f"video-mae on {n} clips"
        torch.manual_seed(seed)
        model = fresh(num_classes=8)
        vk.adapt(model, "video", num_frames=4, tubelet=2)
        vk.adapt(model, "full")
        if n:
            pool = unlabelled[:n]  # nested: each pool holds the smaller ones
            pre_epochs = steps * 32 / n
            with tempfile.TemporaryDirectory() as tmp:
                vk.pretrain(model, vk.data.tensors(pool, [0] * n), objective="video-mae", epochs=round(pre_epochs),
                            warmup_epochs=0.1 * pre_epochs, batch_size=32, seed=seed, out_dir=tmp, progress=False,
                            **(options or {}))
            note(rows, f"pretext loss (mean of the last pre-training epoch), {arm}", seed,
                 model.__dict__["_vitkit_pretrain"]["history"][-1]["train_loss"])
        note(rows, f"k-NN on frozen features (20/class), {arm}", seed,
             vk.evaluate(model.eval(), test, "knn", train=train20)["top1"])
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for shots, train, batch in ((20, train20, 32), (5, train5, 8)):  # 5 optimizer steps per epoch in both
            model.load_state_dict(state)
            note(rows, f"fine-tuned {shots}/class, {arm}", seed,
                 fit_eval(model.train(), train, test, epochs, 1e-3, seed, batch_size=batch))
    return rows


def run_video_mae_pool(seeds, epochs, jobs: int = 1, pools: tuple = POOLS, options: dict | None = None):
    """Top-1 vs the size of the unlabelled pool (`pool_seed`), seeds in `jobs` processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        for part in ex.map(pool_seed, seeds, [epochs] * len(seeds), [pools] * len(seeds), [options] * len(seeds)):
            for name, values in part.items():
                rows.setdefault(name, []).extend(values)
    metrics = list(dict.fromkeys(name.rsplit(", ", 1)[0] for name in rows))  # grouped by metric, arms in order
    return {name: rows[name] for name in sorted(rows, key=lambda k: metrics.index(k.rsplit(", ", 1)[0]))}


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
                    choices=["audio", "tiles", "video", "video-mae", "video-mae-pool", "points", "points-adapters", "paired"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the audio, video and points runs")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each dense (tiles) run")
    ap.add_argument("--blocks", type=int, nargs="+", default=[-1], help="the blocks the dense (tiles) head reads")
    ap.add_argument("--n-points", type=int, default=1024, help="points per cloud of the points-adapters runs")
    ap.add_argument("--positions", nargs="+", default=["projection", "learned"], choices=["projection", "learned"],
                    help="position embeddings of the points-adapters runs")
    ap.add_argument("--jobs", type=int, default=1, help="processes, one seed each (video-mae-pool)")
    ap.add_argument("--pools", type=int, nargs="+", default=list(POOLS), help="unlabelled pool sizes (video-mae-pool)")
    ap.add_argument("--mae", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="video-mae config fields (video-mae-pool), e.g. mask_ratio=0.75 norm_pix_loss=false")
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
        elif task == "video-mae-pool":
            options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.mae)}
            settings = f" {options}" if options else ""
            report(f"moving digits (procedural), 8 directions, 40 test clips per class; video-mae{settings} for "
                   f"160 steps (batch 32) on nested pools of {' / '.join(map(str, args.pools))} unlabelled clips, "
                   f"or none; then video + full, {args.epochs} epochs: top-1",
                   run_video_mae_pool(seeds, args.epochs, args.jobs, tuple(args.pools), options))
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
