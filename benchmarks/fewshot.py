"""PVP, Hint-Aug and dml-proxies on real data (issue 15): the embedded CIFAR ViT adapted to sklearn digits.

    python benchmarks/fewshot.py                   # all three parts, 3 seeds
    python benchmarks/fewshot.py --part dml --seeds 5

Data: sklearn digits (1,797 8x8 grey images), 32x32 RGB, mean = std = 0.5, shuffled with seed 0: the first 1,297
images are the training pool, the last 500 the test images. Model: `vitkit/vit-tiny-cifar` (embedded, pretrained
on CIFAR-10 photos). Seeds change the k-shot draw, the head and the module init, and the data order.

* pvp: source task digits 0-4 (every pool image of those classes), VPT-deep (5 prompts) trained 3 epochs and
  saved by vk.fit; target digits 5-9 at k = 1, 2, 4 images per class, the same VPT-deep module from its own init
  (`pvp` with `chain` only) vs from the source (`pvp init_from=`); 30 epochs, lr 1e-2; accuracy on the test
  images of 5-9.
* hint-aug: all 10 digits at k = 1, 2, 4; VPT-deep (5 prompts), 30 epochs, lr 1e-2; without augmentation vs
  Hint-Aug from epoch 10 (the paper's epsilon 0.001, and epsilon 0.03).
* dml: Proxy-Anchor training on digits 0-4 (pool), retrieval (leave-one-out, Recall@1 and MAP@R) on the test
  images of the held-out digits 5-9: the frozen model's pooled feature vs a linear embedding + Proxy-Anchor on
  the frozen ViT vs dml-proxies (VPT-deep 20 + BitFit + semantic proxies); 5 epochs, batch 32, lr 1e-3.
Prints one line per row (mean ± std over seeds, and each seed's value) and writes
benchmarks/results/fewshot-<part>.json (one file per part, so the parts can run as separate processes).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit as vk

EMBEDDED = "vitkit/vit-tiny-cifar"
VPT = '[{"name": "vpt", "config": {"deep": true, "num_prompts": 5}}]'


def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x, y = ((x - 0.5) / 0.5).contiguous(), torch.tensor(bunch.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1297], y[:1297]), (x[1297:], y[1297:])


def subset(x, y, classes, k=None, seed=0):
    """Images of `classes` relabelled 0..len-1; k per class (seeded draw) when k is given."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in classes:
        idx = (y == c).nonzero().flatten()
        keep.append(idx if k is None else idx[torch.randperm(len(idx), generator=g)[:k]])
    keep = torch.cat(keep)
    relabel = {c: i for i, c in enumerate(classes)}
    return torch.utils.data.TensorDataset(x[keep], torch.tensor([relabel[int(v)] for v in y[keep]]))


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(-1) == y).float().mean().item()


def fresh(num_classes: int, seed: int):
    torch.manual_seed(seed)
    return vk.load(EMBEDDED, num_classes=num_classes)


def fit(model, data, out, *, epochs, lr, seed, batch_size=32):
    vk.fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, warmup_epochs=0, seed=seed, out_dir=out,
           progress=False, save_model=False)


def summary(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}", mean, std


def part_pvp(train, test, seeds, tmp):
    src = fresh(5, 0)
    vk.adapt(src, "vpt", deep=True, num_prompts=5)
    source = subset(*train, range(5))
    vk.fit(src, source, epochs=3, lr=1e-2, batch_size=32, warmup_epochs=0, seed=0, out_dir=tmp / "source",
           progress=False)
    source_acc = accuracy(src, subset(*test, range(5)))
    target_test = subset(*test, range(5, 10))
    rows = {}
    for k in (1, 2, 4):
        for init in ("plain init", "pvp"):
            accs = []
            for seed in range(seeds):
                model = fresh(5, seed)
                kwargs = {"init_from": str(tmp / "source" / "model")} if init == "pvp" else {"chain": VPT}
                torch.manual_seed(seed)
                vk.adapt(model, "pvp", **kwargs)
                fit(model, subset(*train, range(5, 10), k, seed), tmp / "run", epochs=30, lr=1e-2, seed=seed)
                accs.append(accuracy(model, target_test))
            rows[f"{k}-shot {init}"] = accs
            print(f"pvp {k}-shot {init}: {summary(accs)[0]}  seeds {[round(a, 3) for a in accs]}", flush=True)
        gain = [a - b for a, b in zip(rows[f"{k}-shot pvp"], rows[f"{k}-shot plain init"])]  # same seed: paired
        rows[f"{k}-shot gain"] = gain
        print(f"pvp {k}-shot gain over plain init (paired by seed): {summary(gain)[0]}", flush=True)
    print(f"pvp source accuracy (digits 0-4, 3 epochs): {source_acc:.3f}", flush=True)
    return {"source_acc_digits_0_4": source_acc, "rows": rows}


def part_hintaug(train, test, seeds, tmp):
    target_test = subset(*test, range(10))
    conditions = {"none": None, "hint-aug eps 0.001": 0.001, "hint-aug eps 0.03": 0.03}
    rows = {}
    for k in (1, 2, 4):
        for name, eps in conditions.items():
            accs = []
            for seed in range(seeds):
                model = fresh(10, seed)
                if eps is not None:
                    vk.augment(model, "hint-aug", start_epoch=10, epsilon=eps)
                torch.manual_seed(seed)
                vk.adapt(model, "vpt", deep=True, num_prompts=5)
                fit(model, subset(*train, range(10), k, seed), tmp / "run", epochs=30, lr=1e-2, seed=seed)
                accs.append(accuracy(model, target_test))
            rows[f"{k}-shot {name}"] = accs
            print(f"hint-aug {k}-shot {name}: {summary(accs)[0]}  seeds {[round(a, 3) for a in accs]}", flush=True)
            if eps is not None:
                gain = [a - b for a, b in zip(accs, rows[f"{k}-shot none"])]
                print(f"hint-aug {k}-shot {name} gain over none (paired by seed): {summary(gain)[0]}", flush=True)
    return {"rows": rows}


def part_dml(train, test, seeds, tmp, only=()):
    source, held_out = subset(*train, range(5)), subset(*test, range(5, 10))
    frozen = vk.evaluate(fresh(5, 0), held_out, protocol="retrieval")
    rows = {"frozen embedding": [frozen["recall@1"]]}
    maps = {"frozen embedding": [frozen["map@r"]]}
    print(f"dml frozen embedding: R@1 {frozen['recall@1']:.3f} MAP@R {frozen['map@r']:.3f}", flush=True)
    variants = {"linear embedding + Proxy-Anchor": dict(num_prompts=0, bitfit=False, proxy_bias_ratio=1.0),
                "dml-proxies": {},
                "semantic proxies without prompts or BitFit": dict(num_prompts=0, bitfit=False),
                "dml-proxies at lr 1e-4": dict(lr=1e-4)}
    for name, cfg in variants.items():
        if only and name not in only:
            continue
        r1, mapr = [], []
        for seed in range(seeds):
            model = fresh(5, seed)
            vk.adapt(model, "dml-proxies", **cfg)
            fit(model, source, tmp / "run", epochs=5, lr=None, seed=seed)  # the Config's lr (1e-3 by default)
            out = vk.evaluate(model, held_out, protocol="retrieval")
            r1.append(out["recall@1"])
            mapr.append(out["map@r"])
        rows[name], maps[name] = r1, mapr
        print(f"dml {name}: R@1 {summary(r1)[0]} MAP@R {summary(mapr)[0]}  seeds {[round(a, 3) for a in r1]}",
              flush=True)
    return {"recall@1": rows, "map@r": maps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--part", default="pvp,hintaug,dml")
    parser.add_argument("--dml-variants", default="linear embedding + Proxy-Anchor,dml-proxies",
                        help="comma-separated rows of the dml part (also: 'semantic proxies without prompts or BitFit', "
                             "'dml-proxies at lr 1e-4')")
    args = parser.parse_args(argv)
    logging.getLogger("vitkit").setLevel(logging.WARNING)
    train, test = digits()
    parts = {"pvp": part_pvp, "hintaug": part_hintaug, "dml": part_dml}
    results = {"machine": "2-core shared CPU, no GPU", "torch_threads": torch.get_num_threads(), "seeds": args.seeds,
               "command": "python benchmarks/fewshot.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.part.split(","):
            start = time.perf_counter()
            extra = {"only": args.dml_variants.split(",")} if name == "dml" else {}
            result = parts[name](train, test, args.seeds, Path(tmp) / name, **extra)
            result["time_s"] = time.perf_counter() - start
            print(f"{name}: {result['time_s']:.0f} s", flush=True)
            default = parser.get_default("dml_variants")
            suffix = "-" + args.dml_variants.replace(" ", "_") if name == "dml" and args.dml_variants != default else ""
            out = Path(__file__).parent / "results" / f"fewshot-{name}{suffix}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({**results, name: result}, indent=2))
            print(f"results: {out}")


if __name__ == "__main__":
    main()
