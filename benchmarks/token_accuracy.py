"""Accuracy vs tokens removed / FLOPs / throughput of the token-reduction methods on a real checkpoint.

The shamail CIFAR-10 ViT (../shared/weights/shamail-123_VisionTriad-CIFAR10, 65 tokens, 6 blocks, width 128)
over the 10,000 CIFAR-10 test JPEGs (../shared/data/cifar10-test-jpeg), preprocessing 32x32 RGB in [0, 1] then
mean = std = 0.5. Every method is swept over its knob, off the shelf (no retraining); for each method the
setting closest to (and at least) a 25 % FLOPs reduction is reported against the unreduced model.

    python benchmarks/token_accuracy.py                  # sweep on 2,000 images, summary on all 10,000
    python benchmarks/token_accuracy.py --per-class 1000 # sweep on all 10,000 images

FLOPs: torch's FlopCounterMode with eager attention (vk.info); ATS is data-dependent, so its FLOPs are the
mean over --flop-images images counted one at a time. Tokens removed: 1 - mean over blocks of the tokens
entering the MLP (real tokens only for ATS) / 65. Throughput: images/s at batch 500 with --threads threads,
each setting timed alternately with the unreduced model (--repeats pairs, medians), so the speed-up is a
ratio within one stretch of time; on a shared 2-core CPU treat it as indicative.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import vitkit as vk

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test-jpeg" / "test"
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

SWEEPS = {
    "tome": [dict(r=r) for r in (1, 2, 3, 4, 5, 6, 8, 10)] + [dict(r=4, inflect=-1.0)],
    "evit": [dict(keep_rate=k) for k in (0.9, 0.8, 0.7, 0.6, 0.5)]
    + [dict(keep_rate=k, drop_loc=(1, 2, 3, 4)) for k in (0.9, 0.8)],
    "ats": [dict(blocks=b) for b in ((5,), (4, 5), (3, 4, 5), (2, 3, 4, 5))]
    + [dict(blocks=(3, 4, 5), num_samples=48), dict(), dict(num_samples=32)],
    "gtp": [dict(num_prop=p) for p in (1, 2, 3, 4, 6, 8)],
}


def cifar(per_class: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` test JPEGs of each class, normalised as the checkpoint expects."""
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        for f in sorted((CIFAR / name).glob("*.jpg"))[:per_class]:
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(label)
    x = (torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2) - 0.5) / 0.5
    return x.contiguous(), torch.tensor(ys)


def accuracy(model, x, y, batch: int = 500) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def mean_tokens(model, x) -> float:
    """Mean over blocks and images of the (real) tokens entering each block's MLP."""
    counts = []

    def probe(t, ctx):
        s = ctx.state.sizes
        counts.append(float((s[..., 0] > 0).sum(1).float().mean()) if s is not None else float(t.shape[1]))

    runner = vk.get_runner(model)
    runner.add("after_block", probe, owner="probe")
    with torch.inference_mode():
        model(x)
    runner.remove("probe")
    return statistics.mean(counts)


def gmacs(model, images) -> float:
    """Mean GMACs per image, eager attention, counted one image at a time (exact for data-dependent ATS)."""
    attns = [b.attn for b in model.blocks]
    saved = [a.fused_attn for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        total = 0.0
        with torch.inference_mode():
            for img in images:
                with FlopCounterMode(display=False) as counter:
                    model(img[None])
                total += counter.get_total_flops() / 2 / 1e9
    finally:
        for a, s in zip(attns, saved):
            a.fused_attn = s
    return total / len(images)


def paired_speedup(base, model, x, repeats: int) -> tuple[float, float]:
    """(images/s of `model`, speed-up over `base`), timing the two alternately so load changes hit both."""
    tb, tm = [], []
    with torch.inference_mode():
        base(x), model(x)
        for _ in range(repeats):
            for m, ts in ((base, tb), (model, tm)):
                t = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t)
    return len(x) / statistics.median(tm), statistics.median(tb) / statistics.median(tm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=200, help="sweep images per class (all 1000 for the summary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flop-images", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.25, help="FLOPs reduction at which drops are reported")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--replot", action="store_true",
                    help="redraw the PNG from <out>/token_accuracy.json (accuracy and FLOPs panels only)")
    args = ap.parse_args()
    if args.replot:
        rows = json.loads((args.out / "token_accuracy.json").read_text())
        plot(rows, next(r for r in rows if r["method"] == "none"), args.out / "token_accuracy.png", speed=False)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = cifar(args.per_class)
    base = vk.load(SHAMAIL, num_heads=4).eval()
    flop_x = x[torch.randperm(len(x))[:args.flop_images]]
    speed_x = x[:500]
    rows = []

    def run(method, cfg):
        model = copy.deepcopy(base)
        if method != "none":
            vk.accelerate(model, method, **cfg)
        row = dict(method=method, config=cfg, top1=accuracy(model, x, y),
                   gmacs=gmacs(model, flop_x if method == "ats" else flop_x[:1]),
                   tokens=mean_tokens(model, flop_x))
        row["img_s"], row["speedup"] = paired_speedup(base, model, speed_x, args.repeats)
        rows.append(row)
        print(f"{method:5s} {json.dumps(cfg):38s} top-1 {100 * row['top1']:6.2f}  GMACs {row['gmacs']:.4f}  "
              f"tokens {row['tokens']:5.1f}  {row['img_s']:8.0f} img/s", flush=True)
        return row

    ref = run("none", {})
    for method, sweep in SWEEPS.items():
        for cfg in sweep:
            run(method, cfg)
    for row in rows:
        row["flops_reduction"] = 1 - row["gmacs"] / ref["gmacs"]
        row["tokens_removed"] = 1 - row["tokens"] / 65
        row["drop_points"] = 100 * (ref["top1"] - row["top1"])

    summary = {}
    for method in SWEEPS:
        cands = [r for r in rows if r["method"] == method and r["flops_reduction"] >= args.target]
        if cands:
            summary[method] = min(cands, key=lambda r: r["flops_reduction"])
    full_x, full_y = (x, y) if args.per_class >= 1000 else cifar(1000)
    full_ref = ref["top1"] if args.per_class >= 1000 else accuracy(base, full_x, full_y)
    lines = [f"Unreduced: top-1 {100 * ref['top1']:.2f} % on the {len(x)}-image sweep set, "
             f"{100 * full_ref:.2f} % on all {len(full_x)} images; {ref['gmacs']:.4f} GMACs/image.", "",
             f"At >= {100 * args.target:.0f} % FLOPs reduction (closest setting of each sweep), "
             f"top-1 on all {len(full_x)} images:", "",
             "| method | setting | FLOPs reduction | tokens removed | top-1 | drop (points) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for method, r in summary.items():
        model = vk.accelerate(copy.deepcopy(base), method, **r["config"])
        r["top1_full"] = accuracy(model, full_x, full_y) if args.per_class < 1000 else r["top1"]
        r["drop_points_full"] = 100 * (full_ref - r["top1_full"])
        lines.append(f"| {method} | `{json.dumps(r['config'])}` | {100 * r['flops_reduction']:.1f} % | "
                     f"{100 * r['tokens_removed']:.1f} % | {100 * r['top1_full']:.2f} | {r['drop_points_full']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", f"Full sweep ({len(x)} images: the first {args.per_class} of each class):", "",
              "| method | setting | GMACs | FLOPs reduction | tokens removed | top-1 | img/s | speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | `{json.dumps(r['config'])}` | {r['gmacs']:.4f} | "
                     f"{100 * r['flops_reduction']:.1f} % | {100 * r['tokens_removed']:.1f} % | {100 * r['top1']:.2f} |"
                     f" {r['img_s']:.0f} | {r['speedup']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_accuracy.json").write_text(json.dumps(rows, indent=1))
    (args.out / "token_accuracy.md").write_text(table + "\n")
    plot(rows, ref, args.out / "token_accuracy.png")


def plot(rows, ref, path, speed: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if speed else 2, figsize=(15 if speed else 10, 4.2))
    for method in SWEEPS:
        rs = sorted([ref] + [r for r in rows if r["method"] == method], key=lambda r: r["tokens_removed"])
        for ax, key, label in zip(axes, ("tokens_removed", "flops_reduction", "speedup"),
                                  ("tokens removed (mean over blocks)", "FLOPs reduction", "throughput vs unreduced")):
            xs = [100 * r[key] if key != "speedup" else r[key] for r in rs]
            ax.plot(xs, [100 * r["top1"] for r in rs], "o-" if key != "speedup" else "o", label=method, ms=4)
            ax.set_xlabel(label + (" (%)" if key != "speedup" else " (x)"))
    axes[0].set_ylabel("CIFAR-10 top-1 (%)")
    axes[1].axvline(25, color="grey", ls=":")
    for ax in axes:
        ax.axhline(100 * ref["top1"] - 3, color="red", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Off-the-shelf token reduction on the shamail CIFAR-10 ViT (65 tokens, 6 blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
