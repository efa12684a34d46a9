"""DTA and the SWARM audit on a real pretrained ViT: the shamail CIFAR-10 checkpoint as the public source.

DTA. Downstream task: CIFAR-10 relabelled vehicle (airplane, automobile, ship, truck) vs animal, a task the
source's head never saw. Three downstream models are fine-tuned from the source with vk.fit (LoRA, full, VPT)
on --train-per-class test JPEGs of each class; the attack set is --attack-per-class other JPEGs per class.
Adversarial images are crafted on the *pretrained source* only (vk.attack(source, x, method="dta")) and scored
on each downstream model with `result.transfer(downstream, labels=y)`: ASR = fraction of the downstream
model's correctly classified images made wrong. Against: sign noise of the same ε, DTA from a random-init source
of the same architecture, PGD on the source's own CIFAR head (transfer; its clean predictions as labels), and
white-box PGD on each downstream model (ε equal, 10 steps of 2/255). Then DTA at every block (ASR per layer,
a plot) and the block layer="auto" picks.

SWARM. The audit (vk.audit) on the 10-class CIFAR task: VPT-shallow with --prompts prompts, --swarm-epochs
epochs on --swarm-train-per-class JPEGs per class, tested on --swarm-test-per-class others.

    OMP_NUM_THREADS=1 python benchmarks/dta.py --skip-swarm     # DTA: results/dta/dta.json, dta_per_layer.png
    OMP_NUM_THREADS=1 python benchmarks/dta.py --skip-dta       # SWARM audit: results/dta/swarm.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

import vitkit as vk
from vitkit.robust import dta_algo

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" for p in ROOT.parents if (p / "shared" / "weights").is_dir()), ROOT.parent / "shared")
CIFAR = SHARED / "data" / "cifar10-test-jpeg" / "test"
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES = {0, 1, 8, 9}


def source(num_classes=10, pretrained=True):
    model = vk.load(SHAMAIL, num_heads=4, mean=0.5, std=0.5, num_classes=num_classes)
    if not pretrained:  # same architecture, random init
        torch.manual_seed(123)
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") and m is not model else None)
        torch.nn.init.trunc_normal_(model.pos_embed, std=0.02)
        torch.nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model.eval()


def pixels(per_class: int, offset: int, binary: bool):
    """(N, 3, 32, 32) pixels in [0, 1] and labels: files offset..offset+per_class-1 of each class."""
    folder = vk.data.image_folder(CIFAR)  # classes sorted: the CLASSES order
    tf = vk.robust.pixel_transform(source())
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(folder.targets):
        by_class.setdefault(label, []).append(i)
    idx = [i for c in sorted(by_class) for i in by_class[c][offset:offset + per_class]]
    x = torch.stack([tf(folder.raw(i)) for i in idx])
    y = torch.tensor([folder.targets[i] for i in idx])
    return x, (torch.tensor([int(int(v) in VEHICLES) for v in y]) if binary else y)


def normalised(x, y):
    return torch.utils.data.TensorDataset((x - 0.5) / 0.5, y)


def downstream(kind: str, train, epochs: int, out: Path):
    model = source(num_classes=2)
    config = {"lora": dict(rank=8), "full": {}, "vpt": dict(num_prompts=10)}[kind]
    vk.adapt(model, kind, **config)
    vk.fit(model, train, epochs=epochs, batch_size=64, out_dir=out / kind, progress=False, save_model=False)
    return model.eval()


def asr(result, model, y):
    r = result.transfer(model, labels=y)
    return r.attack_success_rate, r.clean_accuracy


def run_dta(args, out: Path, t0: float) -> dict:
    results: dict = {"args": vars(args)}
    # --- downstream models ------------------------------------------------------------------------------
    x_tr, y_tr = pixels(args.train_per_class, 0, binary=True)
    x_at, y_at = pixels(args.attack_per_class, 500, binary=True)
    models = {k: downstream(k, normalised(x_tr, y_tr), args.epochs, Path(args.runs)) for k in ("lora", "full", "vpt")}
    t_fit = time.time() - t0
    print(f"downstream task vehicle/animal: {len(x_tr)} train, {len(x_at)} attack images; fine-tuned in "
          f"{t_fit:.0f} s")

    # --- attacks ------------------------------------------------------------------------------------------
    src, eps = source(), args.eps
    crafted = {
        # the clean images as an "attack" result (DTA at ε = 0 is the identity) carrying the noisy images
        "sign noise": dataclasses.replace(vk.attack(src, x_at, method="dta", eps=0.0, steps=0),
                                          images=dta_algo.sign_noise(x_at, eps, torch.Generator().manual_seed(0))),
        "DTA, random-init source": vk.attack(source(pretrained=False), x_at, method="dta", eps=eps),
        "PGD on the source's CIFAR head": vk.attack(src, x_at, vk.robust.predict(src, x_at, (0.5,) * 3, (0.5,) * 3),
                                                    method="pgd", eps=eps, alpha=2 / 255, steps=10),
        "DTA (layer auto)": vk.attack(src, x_at, method="dta", eps=eps),
    }
    layer, curve = vk.robust.dta.choose_layer(src, x_at[::max(1, len(x_at) // 32)][:32], eps=eps)
    print(f"crafted in {time.time() - t0 - t_fit:.0f} s", flush=True)
    rows = []
    for name, result in crafted.items():
        rows.append((name, {k: asr(result, m, y_at) for k, m in models.items()}))
    white = {k: vk.attack(m, x_at, y_at, method="pgd", eps=eps, alpha=2 / 255, steps=10) for k, m in models.items()}
    rows.append(("white-box PGD on the downstream model",
                 {k: (r.attack_success_rate, r.clean_accuracy) for k, r in white.items()}))
    per_layer = {}
    for block in range(len(src.blocks)):
        r = vk.attack(src, x_at, method="dta", eps=eps, layer=block)
        per_layer[block] = {k: asr(r, m, y_at)[0] for k, m in models.items()}

    print(f"attacks done at {time.time() - t0:.0f} s", flush=True)
    print(f"\nDTA on the shamail CIFAR ViT -> vehicle/animal downstream models, ε = {eps * 255:.0f}/255, "
          f"{len(x_at)} images")
    print("| attack (crafted on) | " + " | ".join(f"ASR {k}" for k in models) + " |")
    print("|---|" + "---|" * len(models))
    print("| (clean accuracy) | " + " | ".join(f"{rows[0][1][k][1]:.3f}" for k in models) + " |")
    for name, vals in rows:
        print(f"| {name} | " + " | ".join(f"{vals[k][0]:.3f}" for k in models) + " |")
    print(f"\nlayer='auto' picks block {layer}; final-feature cosine per block: "
          + ", ".join(f"{i}: {c:.3f}" for i, c in enumerate(curve)))
    print("\n| DTA at block | " + " | ".join(f"ASR {k}" for k in models) + " |")
    print("|---|" + "---|" * len(models))
    for block, vals in per_layer.items():
        print(f"| {block} | " + " | ".join(f"{vals[k]:.3f}" for k in models) + " |")
    results["dta"] = {"rows": {n: v for n, v in rows}, "auto_layer": layer, "final_cosine_per_block": curve,
                      "asr_per_block": per_layer}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in models:
        ax.plot(list(per_layer), [per_layer[b][k] for b in per_layer], marker="o", label=f"{k} (white-box PGD "
                f"{white[k].attack_success_rate:.2f})")
    ax.axvline(layer, color="grey", ls=":", label=f"layer='auto' ({layer})")
    ax.set_xlabel("source block attacked")
    ax.set_ylabel("downstream ASR")
    ax.set_title(f"DTA from shamail, ε={eps * 255:.0f}/255")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dta_per_layer.png", dpi=120)

    return results


def run_swarm(args) -> dict:
    t1 = time.time()
    x_s, y_s = pixels(args.swarm_train_per_class, 0, binary=False)
    x_t, y_t = pixels(args.swarm_test_per_class, 500, binary=False)
    audit = vk.audit(source(), normalised(x_s, y_s), normalised(x_t, y_t), num_prompts=args.prompts,
                     epochs=args.swarm_epochs, lr=args.swarm_lr, distill_weight=args.distill_weight,
                     out_dir=Path(args.runs) / "audit", progress=False)
    print(f"\nSWARM audit, CIFAR-10 (10 classes), {len(x_s)} train / {len(x_t)} test images, "
          f"{args.prompts} prompts, {args.swarm_epochs} epochs at lr {args.swarm_lr:g}, λ {args.distill_weight:g}, "
          f"target class 0 ({CLASSES[0]}), "
          f"{time.time() - t1:.0f} s")
    print(audit.table())
    print(f"target-class rate on clean non-target images, switch off: {audit.figures['target_rate_off']:.3f}")

    return {"args": vars(args), "swarm": audit.report()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=int, default=60)
    ap.add_argument("--attack-per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--eps", type=float, default=10 / 255)
    ap.add_argument("--swarm-train-per-class", type=int, default=50)
    ap.add_argument("--swarm-test-per-class", type=int, default=20)
    ap.add_argument("--swarm-epochs", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--swarm-lr", type=float, default=1e-2)
    ap.add_argument("--distill-weight", type=float, default=100.0, help="SWARM's λ (the paper's 100)")
    ap.add_argument("--skip-dta", action="store_true", help="run the SWARM audit only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dta"))
    ap.add_argument("--runs", default="runs/bench-dta", help="vk.fit's run folders (checkpoints, metrics)")
    ap.add_argument("--skip-swarm", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vitkit").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    if not args.skip_dta:
        results = run_dta(args, out, t0)
        (out / "dta.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.skip_swarm:
        results = run_swarm(args)
        (out / "swarm.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\ntotal {time.time() - t0:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
