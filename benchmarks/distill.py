"""Distillation on real data: the shamail CIFAR-10 ViT teaches a smaller random-init ViT, measured in one run.

Teacher: shamail-123/VisionTriad-CIFAR10 (`../shared/weights`, 0.81 M parameters, 52% top-1 on the CIFAR-10 test
JPEGs; trained by its authors on the CIFAR-10 *train* set, so every test JPEG is unseen by it). Student: timm
`VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2)`, random init
(0.15 M parameters). Data: the CIFAR-10 test JPEGs (`../shared/data/cifar10-test-jpeg`), split with
`vk.data.split(seed=None, train=N, test=M)`: the first N images of each class (in file-name order) train, the next
M of each class test. Training: random-resized-crop (scale 0.6-1) + flip, AdamW, `vk.fit`'s defaults (lr 1e-3,
cosine, 1 warm-up epoch), batch 64, the same epochs for every method.

Rows: `ce` (vk.fit, labels only), `kd` (spec defaults α = 0.5, T = 1), `logit-cache` (TinyViT: soft targets read
from the cache, K = 10 = all classes here, view seeds = the run's seed; the teacher pass that writes the cache is
timed apart), and every other registered distillation method with its defaults (a method that refuses this pair
is listed with its message). Each over `--seeds`; accuracy on the test part, mean ± std (sample std).
Throughput: training images/s of each epoch (`vk.fit`'s `img_per_s`), median over epochs and seeds; the cache's
speed-up is `logit-cache / kd` (same student, same data pipeline, this run).

    OMP_NUM_THREADS=1 python benchmarks/distill.py                       # writes benchmarks/results/distill.*
    OMP_NUM_THREADS=1 python benchmarks/distill.py --epochs 2 --seeds 0 --train 20 --test 10   # smoke
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/distill.py --ddp
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitkit as vk
from vitkit.distill import methods

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
TEACHER = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
DATA = SHARED / "data" / "cifar10-test-jpeg" / "test"
STUDENT = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
               num_classes=10)


def setup(args):
    teacher = vk.load(TEACHER, num_heads=4, mean=0.5, std=0.5)
    dataset = vk.data.image_folder(DATA, preload=True)
    parts = vk.data.split(dataset, seed=None, train=args.train, test=args.test)
    return teacher, parts


def student_for(seed):
    torch.manual_seed(seed)
    return vk.load("vit_tiny_patch16_224", **STUDENT)


def run_one(name, teacher, parts, seed, args, work: Path) -> dict:
    """Train one student with method `name` ('ce' = vk.fit); test accuracy, wall time, img/s per epoch."""
    student = student_for(seed)
    train = parts["train"].with_transform(vk.data.transform(student, train=True, scale=(0.6, 1.0), mean=(0.5,) * 3,
                                                            std=(0.5,) * 3))
    test = parts["test"].with_transform(vk.data.transform(student, mean=(0.5,) * 3, std=(0.5,) * 3))
    fit_kw = dict(epochs=args.epochs, batch_size=args.batch, seed=seed, progress=False, out_dir=work / f"{name}-{seed}")
    row = {"method": name, "seed": seed}
    t0 = time.perf_counter()
    try:
        if name == "ce":
            result = vk.fit(student, train, **fit_kw)
        elif name == "logit-cache":  # writes the cache (one teacher pass per epoch), then trains from it alone
            cache = work / f"cache-{seed}"
            result = vk.distill(teacher, student, train, name, cache_dir=str(cache), view_seed=seed, **fit_kw)
            row["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        else:
            result = vk.distill(teacher, student, train, name, **fit_kw)
    except (ValueError, TypeError, NotImplementedError) as err:
        return {**row, "refused": str(err)}
    row["train_s"] = sum(h["epoch_time_s"] for h in result.history)  # the training epochs alone
    if name == "logit-cache":
        row["cache_write_s"] = time.perf_counter() - t0 - row["train_s"]
    row["img_per_s"] = [h["img_per_s"] for h in result.history]
    row["acc"] = vk.evaluate(student.eval(), test, protocol="finetuned")["top1"]
    return row


def summarise(rows, names) -> list[dict]:
    out = []
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        if any("refused" in r for r in mine):
            out.append({"method": name, "refused": mine[0]["refused"]})
            continue
        accs = [r["acc"] for r in mine]
        speeds = [s for r in mine for s in r["img_per_s"]]
        entry = {"method": name, "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1
                 else 0.0, "accs": accs, "train_s_mean": statistics.mean(r["train_s"] for r in mine),
                 "img_per_s_median": statistics.median(speeds)}
        if name == "logit-cache":
            entry["cache_write_s_mean"] = statistics.mean(r["cache_write_s"] for r in mine)
            entry["cache_bytes"] = mine[0]["cache_bytes"]
        out.append(entry)
    return out


def table(summary, args, teacher_acc) -> str:
    lines = [f"| method | test top-1 (mean ± std, {len(args.seeds)} seeds) | per seed | train wall s (mean) | "
             "train img/s (median) |", "|---|---|---|---|---|",
             f"| teacher (shamail, not trained here) | {teacher_acc:.3f} | - | - | - |"]
    for s in summary:
        if "refused" in s:
            lines.append(f"| {s['method']} | refused: {s['refused']} | | | |")
            continue
        extra = (f" (+ {s['cache_write_s_mean']:.1f} s writing the cache, {s['cache_bytes']:,} bytes)"
                 if "cache_write_s_mean" in s else "")
        lines.append(f"| {s['method']} | {s['acc_mean']:.3f} ± {s['acc_std']:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in s['accs'])} | {s['train_s_mean']:.1f}{extra} | "
                     f"{s['img_per_s_median']:.1f} |")
    return "\n".join(lines)


def throughput_big_teacher(parts, args, work: Path) -> dict:
    """Online kd vs logit-cache img/s when the teacher costs much more than the student's step: a ViT-Ti-sized
    teacher (timm vit_tiny: width 192, depth 12, 5.5 M parameters, random init: speed only) and the same student,
    on the first `--speed-train` images per class, 2 epochs each (the regime of the issue's ViT-B -> ViT-Ti)."""
    torch.manual_seed(0)
    big = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    small = {"train": vk.data.split(parts["train"], seed=None, train=args.speed_train)["train"], "test": parts["test"]}
    sub = argparse.Namespace(**{**vars(args), "epochs": 2})
    kd = run_one("kd", big, small, 0, sub, work / "big")
    cached = run_one("logit-cache", big, small, 0, sub, work / "big")
    speed = {r["method"]: statistics.median(r["img_per_s"]) for r in (kd, cached)}
    return {"kd_img_per_s": speed["kd"], "cache_img_per_s": speed["logit-cache"],
            "ratio": speed["logit-cache"] / speed["kd"], "cache_write_s": cached["cache_write_s"],
            "images": len(small["train"])}


def ddp(args) -> None:
    """One kd and one logit-cache run on 2 processes (torchrun / accelerate launch): each rank trains on half of
    every batch's images, the cache is written by both ranks (the (epoch, shard) pairs alternate)."""
    teacher, parts = setup(args)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "0")  # the same on every rank
    work = Path(args.work or Path(tempfile.gettempdir()) / f"vitkit-distill-ddp-{run_id}")
    rows = [run_one(name, teacher, parts, 0, args, work) for name in ("kd", "logit-cache")]
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for r in rows:
            print(json.dumps({"world_size": world, **{k: v for k, v in r.items() if k != "img_per_s"},
                              "img_per_s_median": statistics.median(r["img_per_s"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100, help="training images per class (first N)")
    parser.add_argument("--test", type=int, default=50, help="test images per class (the next M)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="methods to run (ce, kd, logit-cache, ...)")
    parser.add_argument("--ddp", action="store_true", help="the 2-process run (launch with torchrun)")
    parser.add_argument("--speed-train", type=int, default=20,
                        help="images per class for the big-teacher throughput section (0: skip it)")
    parser.add_argument("--work", help="folder for runs and caches (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill"))
    args = parser.parse_args()
    if args.ddp:
        return ddp(args)
    teacher, parts = setup(args)
    teacher_acc = vk.evaluate(teacher, parts["test"].with_transform(vk.data.transform(teacher)), "finetuned")["top1"]
    repair = {m.name for m in vk.methods("repair")}  # registers, denoise, locality-align: not student training
    others = [m.name for m in methods() if m.name not in ("kd", "logit-cache", *repair)]  # e.g. scalekd
    names = args.only or ["ce", "kd", "logit-cache", *others]
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-bench-"))
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:  # seed-major: a load change on the shared machine hits every method alike
        for name in names:
            rows.append(run_one(name, teacher, parts, seed, args, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "img_per_s"}), flush=True)
    summary = summarise(rows, names)
    big = throughput_big_teacher(parts, args, work) if args.speed_train else None
    by = {s["method"]: s for s in summary}
    ratio = by["logit-cache"]["img_per_s_median"] / by["kd"]["img_per_s_median"] if {"kd", "logit-cache"} <= set(by) \
        and "refused" not in by["kd"] and "refused" not in by["logit-cache"] else None
    report = [f"Command: `{' '.join(['python', *sys.argv])}`",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
              f"total {time.perf_counter() - t0:.0f} s",
              f"Data: CIFAR-10 test JPEGs, first {args.train}/class train, next {args.test}/class test; "
              f"{args.epochs} epochs, batch {args.batch}", "", table(summary, args, teacher_acc), ""]
    if ratio is not None:
        report.append(f"Cache vs online teacher: logit-cache trains at {ratio:.2f}x the images/s of online kd "
                      f"({by['logit-cache']['img_per_s_median']:.1f} vs {by['kd']['img_per_s_median']:.1f}).")
    if big is not None:
        report.append(f"ViT-Ti-sized teacher (5.5 M, random init) -> the same student, {big['images']} images, 2 "
                      f"epochs: logit-cache {big['cache_img_per_s']:.1f} img/s vs online kd {big['kd_img_per_s']:.1f}"
                      f" img/s = {big['ratio']:.2f}x (writing that cache: {big['cache_write_s']:.1f} s).")
    if "ce" in by and "kd" in by and "refused" not in by["kd"]:
        verdict = "beats" if by["kd"]["acc_mean"] > by["ce"]["acc_mean"] else "does NOT beat"
        report.append(f"KD {verdict} CE-only at the same budget: {by['kd']['acc_mean']:.3f} vs "
                      f"{by['ce']['acc_mean']:.3f}.")
    text = "\n".join(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary, "ratio": ratio,
                                                    "teacher_acc": teacher_acc, "big_teacher": big}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
