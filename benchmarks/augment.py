"""TransMix and ForAug in a short `vk.fit` against the same run without them (several seeds, mean ± std).

Both start from the embedded CIFAR model (`vitkit/vit-tiny-cifar`, 32 px) and fine-tune it fully (`full`).

* **TransMix** on scikit-learn digits (a new domain for the model): `--per-class` training images per class,
  the rest of 120 per class held out; three arms with identical Mixup/CutMix draws: no mixing, CutMix/Mixup with
  area labels (TransMix's attention term replaced by the box area: plain timm-style CutMix), TransMix.
* **ForAug** on a background-shortcut task built from digits with exact masks: each digit (the mask = its
  stroke intensity) is pasted on one of ten tinted scikit-image textures; in training the background is the
  label's own texture with probability `--shortcut` (else a random one), so the background predicts the class;
  the test sets use the same rule (`in-dist`) and a random texture (`random bg`). ForAug (`background="all"`,
  masks given) puts each digit on another image's background with its digit filled out.

    OMP_NUM_THREADS=1 nice python benchmarks/augment.py                      # both, 3 seeds (~15 min on 2 cores)
    OMP_NUM_THREADS=1 nice python benchmarks/augment.py --part foraug --seeds 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import vitkit as vk
from vitkit import data
from vitkit.augment import transmix_algo

MODEL = "vitkit/vit-tiny-cifar"
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "checkerboard", "clock")
TINTS = torch.tensor([[1, .3, .3], [.3, 1, .3], [.3, .3, 1], [1, 1, .3], [1, .3, 1], [.3, 1, 1], [1, .6, .2],
                      [.6, .2, 1], [.2, .6, .6], [.7, .7, .7]])


def fit_and_score(augment: list, train, tests: dict, seed: int, epochs: int, batch_size: int) -> dict:
    torch.manual_seed(seed)
    model = vk.adapt(vk.load(MODEL, num_classes=10), "full")
    for name, cfg in augment:
        vk.augment(model, name, **cfg)
    with tempfile.TemporaryDirectory() as out:
        vk.fit(model, train, epochs=epochs, batch_size=batch_size, seed=seed, out_dir=out, progress=False,
               save_model=False)
    model.eval()
    return {k: vk.evaluate(model, ds, "finetuned")["top1"] for k, ds in tests.items()}


def area_only(attn, box_grid, lam_area):  # plain CutMix: the label is the box area
    return torch.full((attn.shape[0],), float(lam_area))


def run_arms(arms: dict, train, tests, seeds, epochs, batch_size, only=None) -> dict:
    results = {}
    for label, (augment, patch) in arms.items():
        if only and label not in only:
            continue
        scores = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            original = transmix_algo.attention_lambda
            if patch is not None:
                transmix_algo.attention_lambda = patch
            try:
                scores.append(fit_and_score(augment, train, tests, seed, epochs, batch_size))
            finally:
                transmix_algo.attention_lambda = original
            print(f"  {label:28s} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores[-1].items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        results[label] = {k: [s[k] for s in scores] for k in tests}
    return results


def table(title: str, results: dict) -> None:
    keys = list(next(iter(results.values())))
    print(f"\n{title}\n\n| arm | " + " | ".join(f"top-1 {k} (mean ± std)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, cols in results.items():
        cells = [f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}" for v in cols.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------------- TransMix
def transmix_part(args) -> None:
    digits = data.digits()
    parts = data.split(digits, seed=0, train=args.per_class, test=120 - args.per_class)
    model = vk.load(MODEL)
    train = parts["train"].with_transform(data.transform(model, train=True))
    tests = {"digits test": parts["test"].with_transform(data.transform(model))}
    mixing = dict(prob=1.0)
    arms = {"no mixing": ([], None), "CutMix/Mixup (area labels)": ([("transmix", mixing)], area_only),
            "TransMix": ([("transmix", mixing)], None)}
    print(f"TransMix: digits, {args.per_class}/class train, {120 - args.per_class}/class test, {args.epochs} epochs")
    table("TransMix on digits", run_arms(arms, train, tests, args.seeds, args.epochs, args.batch_size, args.arm))


# ------------------------------------------------------------------------------------------------------ ForAug
def textures() -> list[torch.Tensor]:
    import skimage.data

    out = []
    for name, tint in zip(TEXTURES, TINTS):
        g = torch.tensor(getattr(skimage.data, name)().astype(np.float32) / 255.0)
        g = F.interpolate(g[None, None], scale_factor=0.25, mode="area")[0, 0]  # texture scale ~ a 32 px image
        out.append(0.15 + 0.6 * g[None] * tint[:, None, None])
    return out


class Composites(torch.utils.data.Dataset):
    """Digits (yellow strokes, mask = stroke intensity) on tinted textures; yields (image, label[, mask])."""

    def __init__(self, indices, shortcut: float, seed: int, with_mask: bool):
        from sklearn.datasets import load_digits

        d = load_digits()
        g = torch.Generator().manual_seed(seed)
        tex = textures()
        images, masks, labels = [], [], []
        for i in indices:
            y = int(d.target[i])
            alpha = F.interpolate(torch.tensor(d.images[i], dtype=torch.float32)[None, None] / 16, size=(20, 20),
                                  mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
            mask = torch.zeros(32, 32)
            top, left = (int(v) for v in torch.randint(2, 11, (2,), generator=g))
            mask[top:top + 20, left:left + 20] = alpha
            t = y if torch.rand((), generator=g) < shortcut else int(torch.randint(10, (), generator=g))
            T = tex[t]
            r, c = (int(torch.randint(0, s - 32, (), generator=g)) for s in T.shape[1:])
            bg = T[:, r:r + 32, c:c + 32]
            fg = torch.tensor([1.0, 1.0, 0.1])[:, None, None].expand(3, 32, 32)
            images.append(((mask * fg + (1 - mask) * bg) - 0.5) / 0.5)  # the model's mean = std = 0.5
            masks.append(mask)
            labels.append(y)
        self.images, self.masks, self.targets = torch.stack(images), torch.stack(masks), labels
        self.classes = [str(i) for i in range(10)]
        self.with_mask = with_mask

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        item = (self.images[i], self.targets[i])
        return item + (self.masks[i],) if self.with_mask else item


def foraug_examples(path: str) -> None:
    """A PNG of eight training composites and what ForAug makes of them (docs/img/foraug_examples.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitkit.augment import mix_batch

    ds = Composites(list(range(8)), 0.9, seed=1, with_mask=True)
    x, y, m = ds.images, torch.tensor(ds.targets), ds.masks
    torch.manual_seed(0)
    out = mix_batch(vk.augment(vk.load(MODEL), "foraug"), x, y, [m]).images
    fig, ax = plt.subplots(2, 8, figsize=(12, 3.4))
    for i in range(8):
        for row, img in enumerate((x[i], out[i])):
            ax[row, i].imshow((img.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1))
            ax[row, i].axis("off")
        ax[0, i].set_title(f"label {int(y[i])}")
    fig.suptitle("top: composites (background = the label's texture); bottom: after foraug (background='all')")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def foraug_part(args) -> None:
    from sklearn.datasets import load_digits

    y = load_digits().target
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.nonzero(y == c)[0])
        train_idx += idx[:args.per_class].tolist()
        test_idx += idx[args.per_class:120].tolist()
    train = Composites(train_idx, args.shortcut, seed=1, with_mask=True)
    tests = {"in-dist": Composites(test_idx, args.shortcut, seed=2, with_mask=False),
             "random bg": Composites(test_idx, 0.0, seed=3, with_mask=False)}
    arms = {"no augmentation": ([], None), "ForAug (background all)": ([("foraug", {})], None)}
    print(f"ForAug: digit composites, background = label's texture with p = {args.shortcut}; {args.per_class}/class "
          f"train, {120 - args.per_class}/class test, {args.epochs} epochs")
    table("ForAug on the background-shortcut task", run_arms(arms, train, tests, args.seeds, args.epochs,
                                                            args.batch_size, args.arm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("transmix", "foraug", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=50, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shortcut", type=float, default=0.9, help="ForAug task: P(background = label's texture)")
    parser.add_argument("--arm", action="append", help="run only this arm (repeatable; default: all)")
    parser.add_argument("--examples", metavar="PNG", help="only write a picture of ForAug's composites")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.examples:
        return foraug_examples(args.examples)
    print(f"model {MODEL}, full fine-tuning, seeds 0..{args.seeds - 1}, torch {torch.__version__}")
    if args.part in ("transmix", "all"):
        transmix_part(args)
    if args.part in ("foraug", "all"):
        foraug_part(args)


if __name__ == "__main__":
    main()
