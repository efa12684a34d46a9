"""B-cosification of the embedded model: accuracy before / after conversion and after a short fine-tune, and the
completeness of its contribution maps on real images, measured in one run.

    python benchmarks/bcosify.py [--train-per-class 300] [--epochs 4] [--out runs/bcosify] [--reuse] [--pointing 25]

CIFAR-10 JPEGs (../shared/data/cifar10-test-jpeg/test), the embedded model's own split: fine-tuned on the first
`train-per-class` images of each class (a subset of the 800 per class it was trained on), evaluated on the last
200 per class (2,000 images, never trained on). Fine-tuning: `vk.fit` with bcosify's own lr (1e-3, AdamW with
weight decay 0, i.e. Adam), batch 64, one warmup epoch then cosine, seed 0. Completeness: for the first
`--explain` evaluation images, |Σ contributions + constant tokens + log(1/(C−1)) − logit| (absolute, relative to
max(1, |logit|) and to |logit|), and the share of the logit (minus the constant bias) carried by the
input-independent tokens. Writes the B-cosified model with `vk.save` to OUT/model (for `vitkit explain ...
--method bcos`) and results.json; `--reuse` loads OUT/model instead of converting and fine-tuning again.

`--pointing N` (with `--reuse`) plays the grid pointing game on N 2×2 mosaics (64 px) of held-out images of four
different classes, each classified correctly by both models on its own: for each quadrant's class, the share
of the positive attribution that falls in that quadrant (0.25 = no localisation), for the B-cosified model's
contribution map and for Grad-CAM on the original embedded model (both at 64 px, `dynamic_img_size=True`;
`--tile 16` shrinks each image to 16 px, so the mosaic has the models' own 32 px input size).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vitkit as vk

NAME = "vitkit/vit-tiny-cifar"
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-jpeg" / "test"


def top1(model, data) -> float:
    return vk.evaluate(model, data, "finetuned", batch_size=250)["top1"]


def completeness(model, test, n: int) -> tuple[dict, str]:
    """Completeness of the contribution maps of the first `n` images of `test` (their predicted class)."""
    x = torch.stack([test[i][0] for i in range(n)])
    e = vk.explain(model, x, method="bcos")
    err = (e.contributions.flatten(1).sum(1) + e.constant + e.logit_bias - e.logit).abs()
    out = {"completeness_max_abs_error": err.max().item(),
           "completeness_max_rel_error": (err / e.logit.abs().clamp_min(1)).max().item(),
           "completeness_max_rel_error_to_logit": (err / e.logit.abs()).max().item(),
           "smallest_abs_logit": e.logit.abs().min().item(),
           "constant_share_median": (e.constant.abs() / (e.logit - e.logit_bias).abs()).median().item()}
    line = (f"completeness on {n} images: max |error| {out['completeness_max_abs_error']:.2e}, relative to "
            f"max(1, |logit|) {out['completeness_max_rel_error']:.2e}, to |logit| "
            f"{out['completeness_max_rel_error_to_logit']:.2e} (smallest |logit| {out['smallest_abs_logit']:.4f}); "
            f"input-independent tokens carry a median {100 * out['constant_share_median']:.1f} % of "
            "|logit - log(1/(C-1))|")
    return out, line


def pointing_game(saved: Path, test, n: int, tile: int = 32) -> str:
    """Grid pointing game on `n` 2×2 mosaics: B-cos contributions vs Grad-CAM on the original model."""
    import numpy as np
    from PIL import Image

    from vitkit.explain import scenes

    bcos, orig = vk.load(saved, dynamic_img_size=True).eval(), vk.load(NAME, dynamic_img_size=True).eval()
    labels, tt = list(test.targets), test.with_transform(vk.data.transform(orig))
    with torch.no_grad():
        x = torch.stack([tt[i][0] for i in range(len(test))])
        ok = (bcos(x).argmax(-1) == torch.tensor(labels)) & (orig(x).argmax(-1) == torch.tensor(labels))
    pools = {c: [i for i in range(len(test)) if labels[i] == c and ok[i]] for c in range(10)}
    chosen, classes = [], []
    for m in range(n):  # classes m, m+1, m+2, m+3 (mod 10), the next unused correct image of each
        cs = [(m + j) % 10 for j in range(4)]
        chosen += [pools[c][m // 10 * 4 + j] for j, c in enumerate(cs)]
        classes.append(cs)
    tiles = [np.asarray(test.raw(i).convert("RGB").resize((tile, tile), Image.BILINEAR)) for i in chosen]
    images, quadrants, _ = scenes.mosaics(tiles)
    x = scenes.to_tensor(images)  # the embedded model's mean = std = 0.5
    scores = {"bcos": [], "gradcam": []}
    for b in range(len(images)):
        for q, c in enumerate(classes[b]):
            inside = torch.from_numpy(quadrants[b] == q)
            pos = vk.explain(bcos, x[b:b + 1], method="bcos", target=c).contributions[0].clamp_min(0)
            scores["bcos"].append(float(pos[inside].sum() / pos.sum()))
            heat = vk.explain(orig, x[b:b + 1], method="gradcam", target=c).heatmap[0]
            scores["gradcam"].append(float(heat[inside].sum() / heat.sum()))
    rows = [f"| {name} | {np.mean(v):.3f} ± {np.std(v):.3f} | {np.mean(np.array(v) > 0.25):.3f} |"
            for name, v in (("B-cosified + fine-tuned, bcos contributions", scores["bcos"]),
                            ("original, Grad-CAM", scores["gradcam"]))]
    return "\n".join([f"grid pointing game, {len(images)} mosaics of {tile}-px tiles x 4 quadrants (chance 0.25):",
                      "| explanation | share in the right quadrant (mean ± std) | fraction above 0.25 |",
                      "|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--explain", type=int, default=50, help="evaluation images checked for completeness")
    parser.add_argument("--out", default="runs/bcosify")
    parser.add_argument("--reuse", action="store_true", help="load OUT/model (an earlier run's) and only measure "
                        "completeness")
    parser.add_argument("--pointing", type=int, default=0, help="with --reuse: mosaics for the grid pointing game")
    parser.add_argument("--tile", type=int, default=32, help="pointing game: pixels per mosaic tile")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()

    model = vk.load(out / "model" if args.reuse else NAME).eval()
    tf = vk.data.transform(model)
    parts = vk.data.split(vk.data.cifar10_jpeg(CIFAR), seed=None, train=800, test=200)
    per_class = vk.data.split(parts["train"], seed=None, train=args.train_per_class)["train"]
    train, test = per_class.with_transform(tf), parts["test"].with_transform(tf)
    if args.reuse:
        print(completeness(model, test, args.explain)[1], flush=True)
        if args.pointing:
            print(pointing_game(out / "model", parts["test"], args.pointing, args.tile))
        return
    results = {"train_images": len(train), "test_images": len(test), "epochs": args.epochs}

    results["original"] = top1(model, test)
    vk.adapt(model, "bcosify")
    results["bcosified"] = top1(model, test)
    print(f"original {results['original']:.4f}, B-cosified before fine-tuning {results['bcosified']:.4f}", flush=True)
    fitted = vk.fit(model, train, test, epochs=args.epochs, batch_size=64, seed=0, out_dir=out / "fit",
                    save_model=False)
    results["fine_tuned_per_epoch"] = [round(h["val_acc"], 4) for h in fitted.history]
    results["lr"], results["lr_source"] = fitted.config["lr"], fitted.config["lr_source"]
    model.eval()
    results["fine_tuned"] = top1(model, test)
    vk.save(model, out / "model")

    measured, line = completeness(model, test, args.explain)
    results.update(measured, seconds=round(time.perf_counter() - start, 1))
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"| model | top-1 on {len(test)} held-out CIFAR JPEGs |\n|---|---|")
    print(f"| embedded model (original) | {results['original']:.4f} |")
    print(f"| B-cosified (b=2, biases removed), before fine-tuning | {results['bcosified']:.4f} |")
    print(f"| B-cosified + {args.epochs} epochs on {len(train)} images (lr {results['lr']:g}) | "
          f"{results['fine_tuned']:.4f} |")
    print(f"per-epoch held-out top-1: {results['fine_tuned_per_epoch']}")
    print(line)
    print(f"{results['seconds']:.0f} s; model saved to {out / 'model'}")


if __name__ == "__main__":
    main()
