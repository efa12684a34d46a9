"""Backbone zoo, Battle-of-the-Backbones style: `vk.bench` over benchmarks/bench_zoo.yaml (two pretrained CIFAR
ViTs, a ConViT, a TinyViT and a ResNet of about 0.8 M parameters, the last three at random init), then one plot
of accuracy per protocol, OOD accuracy and the z-score ranking. Prints the run's table and ranking.

    PYTHONPATH=$PWD nice python benchmarks/bench_zoo.py            # about 10 min on 2 CPU cores
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import vitkit as vk  # noqa: E402
from vitkit.bench.report import _latest_ok, zscores  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "bench_zoo"


def plot(rows: list[dict], path: Path) -> Path:
    rows = [r for r in _latest_ok(rows) if r["status"] == "ok" and r["chain"] == "baseline"]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    protocols = ["linear", "knn", "finetune"]
    acc = {(r["backbone"], r["protocol"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(backbones)
    for i, b in enumerate(backbones):
        xs = [j + i * width for j in range(len(protocols))]
        axes[0].bar(xs, [acc.get((b, p), {}).get("acc", 0) for p in protocols], width, label=b)
        axes[1].bar(xs, [acc.get((b, p), {}).get("ood_mean", 0) for p in protocols], width, label=b)
    for ax, title in zip(axes[:2], ("clean top-1", "OOD mean top-1 (rotate15, invert)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(protocols))], protocols)
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    axes[0].set_ylim(0, 1.3 * max(r["acc"] for r in rows if r["protocol"] in protocols))
    ranked, _ = zscores(rows)
    names = [f"{b}" for b, _, _, _ in ranked][::-1]
    axes[2].barh(names, [z for _, _, z, _ in ranked][::-1], color="tab:gray")
    axes[2].axvline(0, color="k", lw=0.8)
    axes[2].set_xlabel("mean z-score over linear / knn / finetune (baseline chains)")
    axes[2].set_title("ranking")
    print("ranking of the baseline chains (the plot's):", ", ".join(f"{b} {z:+.3f}" for b, _, z, _ in ranked))
    fig.suptitle("CIFAR-10 JPEGs, 20 train / 20 eval per class; ConViT, TinyViT, ResNet: random init")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    result = vk.bench(str(ROOT / "bench_zoo.yaml"), out=OUT, progress=sys.stdout.isatty())
    print(result.table())
    png = plot(result.rows, OUT / "plots" / "zoo.png")
    print(f"plot: {png.relative_to(ROOT.parent)}")
    for r in _latest_ok(result.rows):
        if r["protocol"] == "quality" and r["status"] == "ok":
            print(r["backbone"], r["chain"], "locality per block (mean over heads):",
                  json.dumps({k: round(sum(v) / len(v), 3) for k, v in (r.get("locality_heads") or {}).items()}),
                  "| overlap features:", r.get("overlap_features"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
