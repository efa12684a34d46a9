"""TCPA and Prompt-CAM beside LoRA, AdaptFormer and VPT-deep on one task; Prompt-CAM's maps vs rollout's.

Part 1, accuracy (adapt.md §0 digits task): the embedded pretrained ViT (`vitkit/vit-tiny-cifar`, 0.81 M) with a
fresh 10-class head, adapted to sklearn's digits (1,797 8x8 images upsampled to 32x32, 1,000 train / 500
held-out, fixed split), `vk.fit` for `--epochs` epochs (AdamW, cosine, no warmup, batch 50), each method's own
default lr and weight decay (its Config); several seeds, mean ± std. A short lr sweep for tcpa and prompt-cam
(first seed) checks their defaults.

Part 2, faithfulness (explain.md E3; the insertion/deletion check of Petsiuk et al. 2018): Prompt-CAM on the
embedded model trained on CIFAR-10 JPEGs (`--per-class` of the first 800 images of each class; `--epochs`),
then for held-out JPEGs (from the last 200 of each class) the predicted class is explained by
(a) Prompt-CAM's most important head (top_traits=1), (b) the mean of all its heads, (c) attention rollout of the
same model, (d) a random map. Patches (8x8 grid) are deleted (set to 0 = the mean grey) or inserted (into a
Gaussian-blurred copy) in the map's order, in 16 steps; AUC = mean target probability over the 17 points
(trapezoid). Insertion higher is better, deletion lower is better; "ins - del" summarises both.

    python benchmarks/adapt_prompt.py                      # ~10 min on a 2-core shared CPU
    python benchmarks/adapt_prompt.py --part faithfulness --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import vitkit as vk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-test-jpeg" / "test"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
METHODS = [  # (row label, method, config)
    ("linear", "linear", {}),
    ("lora (q,v r=8)", "lora", {}),
    ("adaptformer", "adaptformer", {}),
    ("vpt-deep (n=5)", "vpt-deep", {}),
    ("tcpa (M=20, l=4, k=3)", "tcpa", {}),
    ("prompt-cam", "prompt-cam", {}),
]
SWEEP = {"tcpa": (1e-3, 4e-3, 1e-2, 3e-2), "prompt-cam": (3e-3, 1e-2, 3e-2)}


def digits(n_train: int = 1000, n_test: int = 500, seed: int = 0):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x, y = ((x - 0.5) / 0.5).contiguous(), torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return torch.utils.data.TensorDataset(x[tr], y[tr]), torch.utils.data.TensorDataset(x[te], y[te])


def cifar(start: int, count: int):
    """Images `start:start+count` (file-name order) of each class, normalised with mean = std = 0.5."""
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        for f in sorted((CIFAR / name).glob("*.jpg"))[start:start + count]:
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(label)
    x = (torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2) - 0.5) / 0.5
    return torch.utils.data.TensorDataset(x.contiguous(), torch.tensor(ys))


def adapted(method: str, config: dict, seed: int):
    model = vk.load("vitkit/vit-tiny-cifar")
    torch.manual_seed(seed)
    model.reset_classifier(10)
    return vk.adapt(model, method, **config)


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data.tensors
    return sum((model(x[i:i + 250]).argmax(-1) == y[i:i + 250]).sum().item() for i in range(0, len(y), 250)) / len(y)


def fit(model, train, epochs, seed, lr=None):
    with tempfile.TemporaryDirectory() as tmp:
        vk.fit(model, train, epochs=epochs, lr=lr, batch_size=50, warmup_epochs=0, seed=seed, out_dir=tmp,
               progress=False, save_model=False)


def part_accuracy(args) -> list[str]:
    train, test = digits()
    lines = ["| method | trainable (with head) | lr | held-out acc, mean ± std | s per run |",
             "|---|---|---|---|---|"]
    rows = [r for r in METHODS if not args.only or r[1] in args.only] if args.part != "sweep" else []
    for label, method, config in rows:
        accs, secs = [], []
        for seed in args.seeds:
            model = adapted(method, config, seed)
            t = time.perf_counter()
            fit(model, train, args.epochs, seed, lr=args.lr)
            secs.append(time.perf_counter() - t)
            accs.append(accuracy(model, test))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lr = args.lr or vk.registry.make_config(vk.registry.get(method), **config).lr
        lines.append(f"| {label} | {trainable:,} | {lr:g} | {np.mean(accs):.3f} ± {np.std(accs):.3f} "
                     f"({', '.join(f'{a:.3f}' for a in accs)}) | {np.mean(secs):.0f} |")
        print(lines[-1], flush=True)
    lines += ["", f"lr sweep (seed {args.seeds[0]}, same task):", "", "| method | lr | held-out acc |", "|---|---|---|"]
    for method, lrs in SWEEP.items() if args.part in ("all", "sweep") else []:
        for lr in lrs:
            model = adapted(method, {}, args.seeds[0])
            fit(model, train, args.epochs, args.seeds[0], lr=lr)
            lines.append(f"| {method} | {lr:g} | {accuracy(model, test):.3f} |")
            print(lines[-1], flush=True)
    return lines


@torch.no_grad()
def auc_curves(model, x, target, patch_map, steps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(insertion AUC (B,), deletion AUC (B,)) of the target probability when patches go in / out in map order."""
    B, (gh, gw) = x.shape[0], patch_map.shape[-2:]
    order = patch_map.flatten(1).argsort(1, descending=True)
    blurred = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(
        ((img.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)).filter(
        __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3)), dtype=np.float32) / 255).permute(2, 0, 1)
        for img in x])
    blurred = (blurred - 0.5) / 0.5
    rows = torch.arange(B)
    ins, dele = [], []
    for s in range(steps + 1):
        k = round(s * gh * gw / steps)
        keep = torch.zeros(B, gh * gw).scatter_(1, order[:, :k], 1.0).reshape(B, 1, gh, gw)
        m = F.interpolate(keep, size=x.shape[-2:], mode="nearest")
        ins.append(model(blurred * (1 - m) + x * m).softmax(-1)[rows, target])
        dele.append(model(x * (1 - m)).softmax(-1)[rows, target])
    area = lambda c: np.trapezoid(torch.stack(c, 1).numpy(), dx=1.0 / steps, axis=1)  # noqa: E731
    return area(ins), area(dele)


def part_faithfulness(args) -> list[str]:
    train, held = cifar(0, args.per_class), cifar(800, args.explain_per_class)
    test = cifar(800 + args.explain_per_class, 20)
    x = held.tensors[0]
    rows = {k: {"ins": [], "del": []} for k in ("prompt-cam top-1 head", "prompt-cam mean of heads", "rollout",
                                                 "random")}
    accs = []
    for seed in args.seeds:
        model = vk.load("vitkit/vit-tiny-cifar")
        torch.manual_seed(seed)
        vk.adapt(model, "prompt-cam")
        fit(model, train, args.epochs, seed)
        accs.append(accuracy(model, test))
        model.eval()
        pc = vk.explain(model, x, method="prompt-cam")
        target = torch.tensor(pc.target)
        maps = {"prompt-cam top-1 head": pc.patch_map, "prompt-cam mean of heads": pc.head_maps.mean(1),
                "rollout": vk.explain(model, x, method="rollout").patch_map,
                "random": torch.rand(pc.patch_map.shape, generator=torch.Generator().manual_seed(seed))}
        for name, m in maps.items():
            ins, dele = auc_curves(model, x, target, m)
            rows[name]["ins"].append(ins.mean())
            rows[name]["del"].append(dele.mean())
        print(f"seed {seed}: acc {accs[-1]:.3f}; " + "; ".join(
            f"{n} ins {r['ins'][-1]:.3f} del {r['del'][-1]:.3f}" for n, r in rows.items()), flush=True)
    ms = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"  # noqa: E731
    lines = [f"Prompt-CAM held-out accuracy (200 JPEGs): {ms(accs)} ({', '.join(f'{a:.3f}' for a in accs)})", "",
             "| map (predicted class) | insertion AUC ↑ | deletion AUC ↓ | ins − del ↑ |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {ms(r['ins'])} | {ms(r['del'])} | {ms(np.subtract(r['ins'], r['del']))} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "accuracy", "sweep", "faithfulness"), default="all",
                   help="accuracy: the method table; sweep: the lr sweep; all: both and the faithfulness check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--only", nargs="+", help="accuracy table: only these methods (registry names)")
    p.add_argument("--lr", type=float, help="accuracy table: this lr instead of each method's default")
    p.add_argument("--per-class", type=int, default=100, help="CIFAR training images per class (part 2)")
    p.add_argument("--explain-per-class", type=int, default=10, help="held-out images per class explained")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared machine: more threads spin at barriers
    lines = [f"`python benchmarks/adapt_prompt.py {' '.join(sys.argv[1:])}`: {platform.processor() or 'CPU'}, "
             f"torch {torch.__version__}, {args.epochs} epochs, seeds {args.seeds}", ""]
    if args.part in ("all", "accuracy", "sweep"):
        lines += ["Digits (embedded ViT, new head, 1,000 train / 500 held-out):", ""] + part_accuracy(args) + [""]
    if args.part in ("all", "faithfulness"):
        lines += [f"Faithfulness (CIFAR JPEGs, {args.per_class}/class train, "
                  f"{10 * args.explain_per_class} held-out explained):", ""] + part_faithfulness(args)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
