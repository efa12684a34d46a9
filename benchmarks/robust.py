"""Robust accuracy of the shamail CIFAR-10 ViT under PGD-10 and FGSM at ε = 0, 1, 2, 4, 8 /255 (issue 16).

The shamail CIFAR-10 ViT (../shared/weights/shamail-123_VisionTriad-CIFAR10, 0.81 M parameters, 32 px,
preprocessing mean = std = 0.5) on a uniform random sample of the CIFAR-10 test JPEGs
(../shared/data/cifar10-test-jpeg; --n images, --sample-seed). ε is in pixel units of [0, 1] images
(L∞); the attack normalises inside (vk.attack). PGD: α = ε/4, 10 steps, random start (seeded); FGSM: one step
of size ε. At ε = 0 both attacks return the images unchanged (tested: tests/robust/test_pgd.py), so the ε = 0
point is the clean accuracy and is not attacked. A cross-check runs torchattacks' PGD on the same images (no random start, so both are
deterministic) and reports how far apart the two backends' adversarial images and predictions are.

    OMP_NUM_THREADS=1 python benchmarks/robust.py                    # 500 images, about 15 min on 2 busy cores

Writes benchmarks/results/robust.json, robust.md and robust_accuracy.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import vitkit as vk
from vitkit.robust.commands import load_pixels

ROOT = Path(__file__).resolve().parents[1]
print = functools.partial(print, flush=True)  # progress lines appear as they happen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared data folder")
    p.add_argument("--n", type=int, default=500, help="test images (uniform sample)")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--eps", default="1,2,4,8", help="ε values in units of 1/255 (ε = 0 is the clean accuracy)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--seed", type=int, default=0, help="PGD random-start seed")
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    shared = Path(args.shared)
    weights = shared / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
    cifar = shared / "data" / "cifar10-test-jpeg" / "test"
    model = vk.load(str(weights), num_heads=4, num_classes=10, mean=0.5, std=0.5).eval()
    images, labels, _, _ = load_pixels(model, str(cifar), args.n, args.sample_seed)
    print(f"shamail CIFAR ViT, {len(labels)} CIFAR-10 test JPEGs (uniform sample, seed {args.sample_seed}); "
          f"normalisation {vk.robust.norm_stats(model)}; torch threads {torch.get_num_threads()}")

    rows = []
    for k in [float(v) for v in args.eps.split(",")]:
        eps = k / 255
        for method, config in (("pgd", dict(eps=eps, alpha=eps / 4, steps=args.steps)), ("fgsm", dict(eps=eps))):
            start = time.perf_counter()
            r = vk.attack(model, images, labels, method=method, seed=args.seed, batch_size=args.batch, **config)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                m, s = r.mean[0], r.std[0]
                loss = float(torch.nn.functional.cross_entropy(model((r.images - m) / s), labels))
            rows.append({"method": method, "eps_255": k, **r.report(), "loss": loss, "seconds": seconds})
            rep = rows[-1]
            asr = "-" if rep["attack_success_rate"] is None else f"{rep['attack_success_rate']:.3f}"
            print(f"{method:5s} ε={k:g}/255  clean {rep['clean_accuracy']:.3f}  robust {rep['robust_accuracy']:.3f}  "
                  f"ASR {asr}  CE {loss:.3f}  L∞ max {255 * rep['linf_max']:.3f}/255  ({seconds:.0f} s)")

    # cross-check against torchattacks on the same images, deterministic setting
    check_eps = 8 / 255
    ours = vk.attack(model, images, labels, method="pgd", eps=check_eps, alpha=check_eps / 4, steps=args.steps,
                     random_start=False, batch_size=args.batch)
    theirs = vk.attack(model, images, labels, method="pgd", eps=check_eps, alpha=check_eps / 4, steps=args.steps,
                       random_start=False, batch_size=args.batch, backend="torchattacks")
    check = {"eps_255": 8, "max_abs_diff": float((ours.images - theirs.images).abs().max()),
             "pixels_differing": float((ours.images != theirs.images).float().mean()),
             "predictions_agree": float((ours.adv_pred == theirs.adv_pred).float().mean()),
             "robust_accuracy_vitkit": ours.robust_accuracy, "robust_accuracy_torchattacks": theirs.robust_accuracy}
    print(f"torchattacks cross-check (PGD-{args.steps}, ε=8/255, no random start): max |Δx| "
          f"{check['max_abs_diff']:.3g}, pixels differing {100 * check['pixels_differing']:.4f} %, predictions "
          f"agree {100 * check['predictions_agree']:.1f} %, robust accuracy {ours.robust_accuracy:.3f} (vitkit) vs "
          f"{theirs.robust_accuracy:.3f} (torchattacks)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(weights.relative_to(shared.parent)) if weights.is_relative_to(shared.parent) else str(weights),
            "n": len(labels), "sample_seed": args.sample_seed, "steps": args.steps, "seed": args.seed,
            "alpha": "eps/4", "threads": torch.get_num_threads()}
    (out / "robust.json").write_text(json.dumps({"meta": meta, "rows": rows, "torchattacks_check": check}, indent=1))
    lines = [f"| ε (/255) | clean acc | PGD-{args.steps} robust acc | PGD-{args.steps} ASR | FGSM robust acc | FGSM ASR |",
             "|---:|---:|---:|---:|---:|---:|"]
    clean = rows[0]["clean_accuracy"]
    lines.append(f"| 0 | {clean:.3f} | {clean:.3f} | 0.000 | {clean:.3f} | 0.000 |")
    for k in sorted({r["eps_255"] for r in rows}):
        pgd, fgsm = (next(r for r in rows if r["eps_255"] == k and r["method"] == m) for m in ("pgd", "fgsm"))

        def f(v):
            return "-" if v is None else f"{v:.3f}"

        lines.append(f"| {k:g} | {f(pgd['clean_accuracy'])} | {f(pgd['robust_accuracy'])} | "
                     f"{f(pgd['attack_success_rate'])} | {f(fgsm['robust_accuracy'])} | {f(fgsm['attack_success_rate'])} |")
    (out / "robust.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, marker, label in (("pgd", "o", f"PGD-{args.steps} (α = ε/4, random start)"), ("fgsm", "s", "FGSM")):
        pts = [(0.0, rows[0]["clean_accuracy"])] + sorted((r["eps_255"], r["robust_accuracy"]) for r in rows
                                                          if r["method"] == method)
        ax.plot(*zip(*pts), marker=marker, label=label)
    ax.axhline(rows[0]["clean_accuracy"], color="grey", ls="--", lw=1, label="clean")
    ax.set_xlabel("ε (L∞, pixel units × 255)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"shamail CIFAR-10 ViT, {len(labels)} test JPEGs")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "robust_accuracy.png", dpi=120)
    print(f"wrote {out / 'robust.json'}, {out / 'robust.md'}, {out / 'robust_accuracy.png'}")


if __name__ == "__main__":
    main()
