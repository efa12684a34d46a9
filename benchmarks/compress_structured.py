"""Structured pruning, BiViT and Sparse-then-Prune, measured in one run each (issue 13; figures in RESULTS.md).

Parts (`--part`, repeatable; default all):
- `speed`: `prune-structured` at 30 % (and 50 %) of heads and MLP channels on `vit_base_patch16_224` (random
  weights), batch 8, fp32 on CPU: paired, interleaved timing (each round times the dense model and the pruned one
  back to back, the order alternating; the ratio is the median over rounds), GMACs and parameters.
- `shamail`: top-1 of the shamail CIFAR-10 ViT on a CIFAR-10 test-JPEG subsample (the last `--images`/10 of each
  class) after `prune-structured` at 0-50 %, zero-shot, and at 30 % after a short recovery fit (`full`, AdamW)
  on the first `--train-images`/10 JPEGs of each class (disjoint).
- `binary`: the embedded model adapted to sklearn digits (`full`, `--epochs`), then `binary` (BiViT, W1A1 and
  weights only) fitted for `--epochs` with plain cross-entropy: recovery = binary top-1 / full-precision top-1
  on the 500 held-out digits, per seed.
- `stp`: the same full-precision digits model against one fine-tuned with the sparse-then-prune penalty
  (`--stp-weight`, all blocks), both pruned by global magnitude at 30-90 %, per seed.

    OMP_NUM_THREADS=2 python benchmarks/compress_structured.py --seeds 0 1 --epochs 3 --weights-only
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import vitkit as vk
from vitkit.compress import sparse_then_prune
from vitkit.info import count_gmacs

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]  # benchmarks/peft.py would
sys.path.insert(0, str(ROOT / "tests" / "adapt"))  # shadow the peft package (imported by prune's LoRA check)
from digits_task import accuracy, digits_split, pretrained  # noqa: E402  (the PEFT tests' digits task)

SHAMAIL = Path("weights") / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
CIFAR = Path("data") / "cifar10-test-jpeg" / "test"


def paired_ratio(base, model, x, rounds: int) -> dict:
    """Median over rounds of t(base) / t(model), both timed back to back in each round (order alternating)."""
    ratios, times = [], {"base": [], "model": []}
    with torch.inference_mode():
        base(x), model(x)  # warm-up
        for i in range(rounds):
            pair = {}
            for name in (("base", "model") if i % 2 == 0 else ("model", "base")):
                start = time.perf_counter()
                (base if name == "base" else model)(x)
                pair[name] = time.perf_counter() - start
                times[name].append(pair[name])
            ratios.append(pair["base"] / pair["model"])
    return {"speedup": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
            "base_s": statistics.median(times["base"]), "model_s": statistics.median(times["model"])}


def speed_part(args) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"\n### prune-structured speed: vit_base_patch16_224, random weights, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, {args.rounds} paired rounds\n")
    print("| heads, channels removed | heads kept | MLP width | params (M) | GMACs | s / batch (dense) | "
          "s / batch (pruned) | speed-up (median of paired ratios) | ratios |")
    print("|---|---|---|---|---|---|---|---|---|")
    gmacs = count_gmacs(base, (3, 224, 224))
    for p in args.fractions:
        model = vk.compress(copy.deepcopy(base), "prune-structured", heads=p, channels=p).eval()
        cfg = vk.applied(model)[0].config
        r = paired_ratio(base, model, x, args.rounds)
        print(f"| {p:.0%} | {cfg.kept_heads[0]} / 12 | {cfg.kept_channels[0]} / 3072 | "
              f"{sum(t.numel() for t in model.parameters()) / 1e6:.1f} (dense 86.6) | "
              f"{count_gmacs(model, (3, 224, 224)):.2f} (dense {gmacs:.2f}) | {r['base_s']:.2f} | {r['model_s']:.2f} | "
              f"**{r['speedup']:.2f}x** | {r['ratios']} |", flush=True)


def _cifar(model, part: str, per_class: int, shared: Path):
    data = vk.data.cifar10_jpeg(shared / CIFAR)
    n = len(data) // len(data.classes)
    split = vk.data.split(data, seed=None, train=n - per_class, eval=per_class) if part == "eval" else \
        vk.data.split(data, seed=None, train=per_class, eval=n - per_class)
    return split[part if part == "eval" else "train"].with_transform(vk.data.transform(model))


def top1(model, data) -> float:
    return vk.evaluate(model.eval(), data, protocol="finetuned", batch_size=250)["top1"]


def shamail_part(args) -> None:
    base = vk.load(str(args.shared / SHAMAIL), num_heads=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).eval()
    test = _cifar(base, "eval", args.images // 10, args.shared)
    print(f"\n### prune-structured accuracy: shamail CIFAR-10 ViT (4 heads, MLP 256), {len(test)} test JPEGs\n")
    print("| heads, channels removed | heads kept / block | MLP width | GMACs | top-1 zero-shot | top-1 after fit |")
    print("|---|---|---|---|---|---|")
    dense = count_gmacs(base, (3, 32, 32))
    for p in args.fractions_small:
        model = vk.compress(copy.deepcopy(base), "prune-structured", heads=p, channels=p)
        cfg = vk.applied(model)[0].config
        acc = top1(model, test)
        after = ""
        if p == args.recover_at:
            train = _cifar(base, "train", args.train_images // 10, args.shared)
            vk.adapt(model, "full")
            vk.fit(model, train, epochs=args.recover_epochs, lr=1e-4, batch_size=64, warmup_epochs=0, seed=0,
                   out_dir=args.out / "shamail-recover", progress=False, save_model=False)
            after = f"{top1(model, test):.4f} ({args.recover_epochs} epoch(s) on {len(train)} JPEGs, lr 1e-4)"
        print(f"| {p:.0%} | {cfg.kept_heads[0]} | {cfg.kept_channels[0]} | {count_gmacs(model, (3, 32, 32)):.4f} "
              f"(dense {dense:.4f}) | {acc:.4f} | {after} |", flush=True)


def _fit(model, train, args, out: str, lr=None):
    vk.fit(model, train, epochs=args.epochs, lr=lr, batch_size=50, warmup_epochs=0, seed=0, out_dir=args.out / out,
           progress=False, save_model=False)
    return model


def digits_parts(args) -> None:
    train, test = digits_split(n_train=args.train_digits)
    rows_b, rows_s = [], []
    for seed in args.seeds:
        torch.manual_seed(seed)
        fp = _fit(vk.adapt(pretrained(seed), "full"), train, args, f"fp-{seed}", lr=1e-3)
        fp_acc = accuracy(fp, test)
        print(f"seed {seed}: full precision {fp_acc:.4f}", flush=True)
        if "binary" in args.part:
            for activations in (True, False) if args.weights_only else (True,):
                model = vk.compress(copy.deepcopy(fp), "binary", activations=activations)
                start = accuracy(model, test)
                _fit(model, train, args, f"bin-{seed}-{activations}")
                acc = accuracy(model, test)
                rows_b.append((seed, activations, fp_acc, start, acc))
                print(f"  binary activations={activations}: {start:.4f} -> {acc:.4f}", flush=True)
        if "stp" in args.part:
            reg = vk.compress(vk.adapt(pretrained(seed), "full"), "sparse-then-prune", weight=args.stp_weight)
            _fit(reg, train, args, f"stp-{seed}", lr=1e-3)
            row = [seed, fp_acc, accuracy(reg, test)]
            for s in args.sparsities:
                row.append(accuracy(vk.compress(copy.deepcopy(fp), "prune", sparsity=s, scope="global"), test))
                row.append(accuracy(sparse_then_prune.finish(copy.deepcopy(reg), sparsity=s), test))
            rows_s.append(row)
            print(f"  stp: {row}", flush=True)
    if rows_b:
        print(f"\n### binary (BiViT) recovery: embedded model adapted to {len(train)} digits (`full`, {args.epochs} "
              f"epochs, lr 1e-3), then `binary` fitted {args.epochs} epochs (plain CE, the Config's lr 1e-3); 500 "
              "held-out digits\n")
        print("| seed | binarised | full precision | binarised, before fit | after fit | recovery |")
        print("|---|---|---|---|---|---|")
        for seed, act, fp_acc, start, acc in rows_b:
            print(f"| {seed} | {'W1A1 (paper)' if act else 'weights only'} | {fp_acc:.4f} | {start:.4f} | {acc:.4f} | "
                  f"**{acc / fp_acc:.1%}** |")
        for act in sorted({a for _, a, *_ in rows_b}, reverse=True):
            rec = [acc / fp for _, a, fp, _, acc in rows_b if a == act]
            print(f"\n{'W1A1' if act else 'weights only'}: mean recovery {statistics.mean(rec):.1%} over "
                  f"{len(rec)} seed(s)")
    if rows_s:
        print(f"\n### sparse-then-prune vs one-shot prune at equal sparsity: digits, `full` fine-tune {args.epochs} "
              f"epochs lr 1e-3 without / with the penalty (λ = {args.stp_weight}, all blocks), then global magnitude "
              "pruning of qkv/proj/fc1/fc2, no fine-tune after\n")
        print("| seed | dense: plain | dense: penalty | " + " | ".join(
            f"{s:.0%}: plain | {s:.0%}: sparse-then-prune" for s in args.sparsities) + " |")
        print("|" + "---|" * (3 + 2 * len(args.sparsities)))
        for row in rows_s:
            print("| " + " | ".join([str(row[0])] + [f"{v:.4f}" for v in row[1:]]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=["speed", "shamail", "binary", "stp"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--fractions-small", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--images", type=int, default=2000, help="CIFAR test JPEGs evaluated (per class: /10)")
    parser.add_argument("--train-images", type=int, default=2000, help="CIFAR JPEGs of the recovery fit")
    parser.add_argument("--recover-at", type=float, default=0.3)
    parser.add_argument("--recover-epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-digits", type=int, default=1000, help="training digits (held-out: 500)")
    parser.add_argument("--weights-only", action="store_true", help="binary: also the weights-only variant")
    parser.add_argument("--stp-weight", type=float, default=0.01)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                        help="the folder holding weights/ and data/ (default: ../shared)")
    parser.add_argument("--out", type=Path, default=Path("runs/compress_structured"))
    args = parser.parse_args()
    args.part = args.part or ["speed", "shamail", "binary", "stp"]
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; parts {args.part}")
    if "speed" in args.part:
        speed_part(args)
    if "shamail" in args.part:
        shamail_part(args)
    if "binary" in args.part or "stp" in args.part:
        digits_parts(args)


if __name__ == "__main__":
    main()
