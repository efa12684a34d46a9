"""Real-teacher checks for ScaleKD, PH-Reg and the DVT denoiser (docs/distill.md; RESULTS.md "Distillation: ScaleKD,
registers, denoise").

1. The shamail CIFAR ViT (0.81 M parameters, ../shared/weights) teaches a smaller random-init ViT (width 64, depth 4)
   on a CIFAR-10 JPEG subsample: CE only (kd with alpha 0), KD (alpha 0.5, T 1), ScaleKD (defaults), equal epochs,
   several seeds; student top-1 on a disjoint held-out subsample, mean ± std, and wall time.
2. PH-Reg on the shamail model: artefact score (fraction of last-block patch tokens with norm > mu + 3 sigma) on
   held-out images before and after self-distilling 16 registers.
3. DVT denoiser on the shamail model: high-norm fraction and total variation of the final patch features before and
   after the denoiser, and a dense-feature PNG.
4. Locality alignment of the shamail model (64 px, dynamic size) on 2x2 CIFAR mosaics: the locality metric (patch
   probe) before and after.

    VITKIT_SHARED=../shared python benchmarks/distill_repair.py [--seeds 3] [--epochs 5] [--train 100] [--val 100]
        [--parts kd,registers,denoise,locality]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitkit as vk

SHARED = Path(os.environ.get("VITKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))  # beside the repo
CIFAR = SHARED / "data" / "cifar10-test-jpeg" / "test"
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def teacher_model():
    return vk.load(SHAMAIL, num_heads=4, **NORM).eval()


def student_model(seed: int):
    torch.manual_seed(seed)
    return vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=4,
                   num_heads=4, num_classes=10, **NORM)


def data(n_train: int, n_val: int, seed: int = 0):
    full = vk.data.cifar10_jpeg(CIFAR)
    parts = vk.data.split(full, seed=seed, train=n_train, val=n_val)
    tf_train, tf_val = vk.data.transform(student_model(0), train=True), vk.data.transform(student_model(0))
    return parts["train"].with_transform(tf_train), parts["val"].with_transform(tf_val)


def images(dataset, n: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(n)])


def part_kd(args, train, val) -> None:
    runs = {"CE (kd alpha=0)": dict(method="kd", alpha=0.0), "KD (alpha 0.5, T 1)": dict(method="kd"),
            "ScaleKD": dict(method="scalekd")}
    teacher = teacher_model()
    acc_t = vk.evaluate(teacher, val)["top1"]
    print(f"teacher (shamail ViT) top-1 on the {len(val)} held-out images: {acc_t:.3f}")
    print(f"| student run | top-1 mean ± std ({args.seeds} seeds) | per seed | wall s / run |")
    print("|---|---|---|---|")
    for name, kw in runs.items():
        if args.only and kw["method"] + ("-ce" if kw.get("alpha") == 0.0 else "") not in args.only.split(","):
            continue
        accs, walls = [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            student = student_model(seed)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                result = vk.distill(teacher, student, train, val=val, epochs=args.epochs, batch_size=64, lr=1e-3,
                                    weight_decay=0.05, seed=seed, out_dir=out, progress=False, **kw)
            walls.append(time.perf_counter() - t0)
            accs.append(result.history[-1]["val_acc"])
        print(f"| {name} | {statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.3f} | "
              f"{', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(walls):.0f} |", flush=True)


def part_registers(args, train, val) -> None:
    from vitkit.distill import registers

    teacher = teacher_model()
    held_out = images(val, 256)
    before = registers.artefact_score(teacher, held_out)
    student = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        vk.distill(teacher, student, train, method="registers", epochs=args.reg_epochs, out_dir=out, progress=False)
        wall = time.perf_counter() - t0
        loaded = vk.load(Path(out) / "model").eval()
        with torch.no_grad():
            same = torch.allclose(loaded(held_out), student.eval()(held_out), atol=1e-5)
    after = registers.artefact_score(student, held_out)
    acc_before, acc_after = vk.evaluate(teacher, val)["top1"], vk.evaluate(student, val)["top1"]
    print(f"PH-Reg on the shamail ViT, 16 registers, {args.reg_epochs} epochs on {len(train)} images, "
          f"batch 8, lr 1e-4 ({wall:.0f} s)")
    print(f"artefact score (last-block patch tokens with norm > mu + 3 sigma, 256 held-out images): "
          f"before {before:.4f}, after {after:.4f}")
    print(f"top-1 on {len(val)} held-out images (head unchanged): before {acc_before:.3f}, after {acc_after:.3f}; "
          f"save/load reproduces logits: {same}")


def part_denoise(args, train, val) -> None:
    from vitkit.distill import denoise, registers_algo

    teacher = teacher_model()
    held_out = images(val, 256)
    student = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        vk.distill(teacher, student, train, method="denoise", epochs=args.reg_epochs, out_dir=out, progress=False)
    wall = time.perf_counter() - t0
    print(f"DVT denoiser on the shamail ViT, {args.reg_epochs} epochs on {len(train)} images, batch 8, lr 2e-4 "
          f"({wall:.0f} s); 256 held-out images, final-norm patch features:")
    print("| features | high-norm fraction (> mu + 3 sigma) | total variation | cosine to the 10-view TTA average |")
    print("|---|---|---|---|")
    views = registers_algo.choose_views((8, 8), 10, generator=torch.Generator().manual_seed(1))
    from vitkit.distill.registers import tta_target

    target = tta_target(teacher, held_out, views)
    for label, model in (("raw", teacher), ("denoised", student)):
        feats = denoise.dense_features(model, held_out)
        tokens = feats.flatten(2).transpose(1, 2)
        cos = torch.nn.functional.cosine_similarity(tokens, target, dim=-1).mean()
        print(f"| {label} | {float(registers_algo.high_norm_fraction(tokens)):.4f} | "
              f"{denoise.total_variation(feats):.3f} | {cos:.3f} |")
    png = Path(args.out) / "denoise_view.png"
    denoise.feature_view({"raw": teacher, "denoised": student}, held_out[:4], png)
    print(f"dense-feature view (input, PCA colours, norm map; raw vs denoised): {png}")


def part_locality(args, train, val) -> None:
    from vitkit.distill import locality_align_algo as algo

    def mosaic_set(dataset, n):
        x = images(dataset, 4 * n)
        y = torch.tensor([dataset[i][1] for i in range(4 * n)])
        return algo.mosaics(x, y, (16, 16))

    teacher = vk.load(SHAMAIL, num_heads=4, dynamic_img_size=True, **NORM).eval()
    x_train, y_train = mosaic_set(train, args.mosaics)
    x_test, y_test = mosaic_set(val, args.mosaics // 2)

    def metric(model):
        f_train = model.forward_features(x_train)[:, model.num_prefix_tokens:]
        f_test = model.forward_features(x_test)[:, model.num_prefix_tokens:]
        with torch.no_grad():
            return algo.patch_probe_accuracy(f_train.reshape(-1, f_train.shape[-1]).detach(), y_train.flatten(),
                                             f_test.reshape(-1, f_test.shape[-1]).detach(), y_test.flatten())

    with torch.no_grad():
        before = metric(teacher)
    student = copy.deepcopy(teacher)
    data = torch.utils.data.TensorDataset(x_train, y_train[:, 0, 0])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        vk.distill(teacher, student, data, method="locality-align", epochs=args.reg_epochs, batch_size=16,
                   out_dir=out, progress=False)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        after = metric(student.eval())
    print(f"locality alignment of the shamail ViT on {len(x_train)} 2x2 CIFAR mosaics (64 px), "
          f"{args.reg_epochs} epochs ({wall:.0f} s)")
    print(f"locality metric (patch-probe top-1, ridge probe on single patch features, {y_test.numel()} test "
          f"patches, chance 0.1): before {before:.3f}, after {after:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--only", help="student runs to do: kd-ce, kd, scalekd (comma-separated; default all)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--reg-epochs", type=int, default=3)
    ap.add_argument("--train", type=int, default=100, help="training images per class")
    ap.add_argument("--val", type=int, default=100, help="held-out images per class")
    ap.add_argument("--parts", default="kd,registers,denoise,locality")
    ap.add_argument("--mosaics", type=int, default=200, help="training mosaics for the locality part")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the PNG")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train, val = data(args.train, args.val)
    print(f"CIFAR-10 JPEG subsample: {len(train)} training, {len(val)} held-out images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    parts = args.parts.split(",")
    if "kd" in parts:
        part_kd(args, train, val)
    if "registers" in parts:
        part_registers(args, train, val)
    if "denoise" in parts:
        part_denoise(args, train, val)
    if "locality" in parts:
        part_locality(args, train, val)


if __name__ == "__main__":
    main()
