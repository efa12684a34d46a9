"""Compression side by side, measured in one run: every registered compress method (defaults) plus reference
settings, against fp32 and against `torch.ao.quantization.quantize_dynamic` itself.

1. Speed: vit_base_patch16_224 (random weights: speed does not depend on them), batch 8, `--threads` CPU
   threads. Every model runs right after an fp32 baseline forward, in a shuffled order each round; the ratio is
   the median over `--rounds` of t(fp32) / t(model) within each pair (robust to load on a shared machine).
   Columns: model bytes (the whole state dict as safetensors), GMACs per image (eager attention, quantised
   layers counted as float), the ratio, and for int8 the same ratio of `quantize_dynamic` on all Linears.
2. Accuracy: the shamail CIFAR-10 ViT (`../shared/weights`, 0.81 M parameters) on an even subsample of the
   CIFAR-10 test JPEGs (`--images`, default 2,000: 200 per class), same rows, plus the bytes `vk.save` writes
   (only what differs from the checkpoint file).
3. Accuracy vs sparsity on shamail, 0-90 %, global against per-layer magnitude pruning, and 2:4 / 4:8: a table
   and `benchmarks/results/compress_sparsity.png`.

    nice python benchmarks/compress.py                  # writes benchmarks/results/compress.{md,json}, *.png
    nice python benchmarks/compress.py --rounds 3 --images 500
    nice python benchmarks/compress.py --part speed & nice python benchmarks/compress.py --part accuracy; wait
    python benchmarks/compress.py --part report
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# `python benchmarks/compress.py` puts benchmarks/ first on the path, where benchmarks/peft.py hides the peft package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import timm
import torch
import torch.nn as nn

import vitkit as vk
from vitkit.compress._report import size_report
from vitkit.info import count_gmacs

ROOT = Path(__file__).resolve().parents[1]
SHAMAIL = Path("weights") / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
CIFAR = Path("data") / "cifar10-test-jpeg" / "test"
TOME_R = {"vit_base": 13, "shamail": 2}  # ToMe r per block: the paper's ViT-B setting; 2 of shamail's 64 tokens


def reference_int8(model: nn.Module) -> nn.Module:
    """torch's own dynamic int8 on every Linear (what the issue's 3.2x was measured with)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def variants(base: nn.Module, which: str) -> dict:
    """name -> (model, how it was made), or (None, "refused: ...") for a method that refused."""
    out = {"fp32": (base, "the model as loaded")}

    def add(name, how, *steps, start=base):
        model = copy.deepcopy(start)
        try:
            for method, cfg in steps:
                vk.apply(model, method, **cfg)
        except (NotImplementedError, ValueError) as err:
            out[name] = (None, f"refused: {err}")
            return
        out[name] = (model.eval(), how)

    for m in vk.methods("compress"):
        add(m.name, "defaults", (m.name, {}))
    out["torch.ao quantize_dynamic (all Linears)"] = (reference_int8(base), "torch reference")
    add("int8 backend=torchao", "", ("int8", {"backend": "torchao"}))
    add("int8 weight_only (torchao)", "", ("int8", {"weight_only": True}))
    add("prune 2:4", "", ("prune", {"pattern": "2:4"}))
    add("prune 0.5, make_permanent", "", ("prune", {"sparsity": 0.5, "permanent": True}))
    r = TOME_R[which]
    add("tome", f"r={r}", ("tome", {"r": r}))
    merged = vk.adapt(copy.deepcopy(base), "lora", rank=8)
    with torch.no_grad():  # a trained-looking update, merged (lora.merge): a plain timm model again
        for name, p in merged.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    from vitkit.adapt.lora import merge

    merge(merged)
    add("lora (merged) + tome + int8", f"rank 8, r={r}", ("tome", {"r": r}), ("int8", {}), start=merged)
    add("lora (merged) + prune 0.5 + int8", "rank 8", ("prune", {"sparsity": 0.5}), ("int8", {}), start=merged)
    return out


def paired_speed(models: dict, x: torch.Tensor, rounds: int) -> dict:
    """name -> median over rounds of t(fp32) / t(model), each model right after an fp32 forward."""
    base = models["fp32"]
    ratios = {n: [] for n in models}
    seconds = {n: [] for n in models}
    rng = random.Random(0)
    order = list(models)
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for i in range(rounds):
            rng.shuffle(order)
            for name in order:
                pair = []
                for m in (base, models[name]):
                    t = time.perf_counter()
                    m(x)
                    pair.append(time.perf_counter() - t)
                ratios[name].append(pair[0] / pair[1])
                seconds[name].append(pair[1])
            print(f"  round {i + 1}/{rounds} done", flush=True)
    return {n: {"speedup": statistics.median(r), "s_per_batch": statistics.median(seconds[n]), "ratios": r}
            for n, r in ratios.items()}


def speed_part(args) -> list[dict]:
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    made = variants(base, "vit_base")
    models = {n: m for n, (m, _) in made.items() if m is not None}
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size)
    print(f"speed: {len(models)} models, {args.rounds} rounds", flush=True)
    speed = paired_speed(models, x, args.rounds)
    rows = []
    for name, (model, how) in made.items():
        row = {"name": name, "how": how}
        if model is not None:
            size = size_report(model)
            row.update(model_bytes=size["model_bytes"], sparsity=size["sparsity"], dtype=size["dtype"],
                       gmacs=count_gmacs(model, (3, *base.patch_embed.img_size)), **speed[name])
        rows.append(row)
    return rows


def shamail(shared: Path):
    return vk.load(str(shared / SHAMAIL), num_heads=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def cifar(model, n: int, shared: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n/10 test JPEGs of each class (by file name) through the model's transform, as tensors."""
    data = vk.data.cifar10_jpeg(shared / CIFAR, preload=False)
    part = vk.data.split(data, seed=None, eval=n // len(data.classes))["eval"]
    part = part.with_transform(vk.data.transform(model))
    items = [part[i] for i in range(len(part))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.inference_mode()
def top1(model, data) -> float:
    x, y = data
    model.eval()
    pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return (pred == y).float().mean().item()


def accuracy_part(args) -> tuple[list[dict], dict]:
    base = shamail(args.shared).eval()
    data = cifar(base, args.images, args.shared)
    rows = []
    for name, (model, how) in (variants(base, "shamail") if args.part != "curve" else {}).items():
        row = {"name": name, "how": how}
        if model is not None:
            if args.part != "sizes":
                row["acc"] = top1(model, data)
            row["model_bytes"] = size_report(model)["model_bytes"]
            if vk.applied(model):
                with tempfile.TemporaryDirectory() as tmp:
                    row["save_bytes"] = (vk.save(model, Path(tmp) / "m") / "weights.safetensors").stat().st_size
        rows.append(row)
        print(f"  {name}: {row.get('acc', row['how'])}", flush=True)
    curve = {"sparsity": [i / 10 for i in range(10)], "global": [], "layer": [], "n_images": len(data[1])}
    if args.part == "sizes":
        return rows, curve
    for s in curve["sparsity"]:
        for scope in ("global", "layer"):
            model = vk.compress(copy.deepcopy(base), "prune", sparsity=s, scope=scope)
            curve[scope].append(top1(model, data))
        print(f"  sparsity {s:.1f}: global {curve['global'][-1]:.4f} layer {curve['layer'][-1]:.4f}", flush=True)
    for pattern in ("2:4", "4:8"):
        curve[pattern] = top1(vk.compress(copy.deepcopy(base), "prune", pattern=pattern), data)
    return rows, curve


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * s for s in curve["sparsity"]]
    ax.plot(xs, curve["global"], "o-", label="global magnitude")
    ax.plot(xs, curve["layer"], "s-", label="per-layer magnitude")
    for pattern, marker in (("2:4", "^"), ("4:8", "v")):
        ax.plot([50], [curve[pattern]], marker, label=f"{pattern} (50 %)")
    ax.axhline(curve["global"][0] - 0.01, color="grey", ls=":", lw=0.8, label="dense - 1 point")
    ax.set_xlabel("sparsity of qkv / proj / fc1 / fc2 weights (%)")
    ax.set_ylabel(f"top-1, CIFAR-10 ({curve['n_images']} test JPEGs)")
    ax.set_title("shamail CIFAR-10 ViT: one-shot magnitude pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def knee(curve: dict, scope: str, tol: float = 0.01) -> float:
    """Essential sparsity: the largest s whose accuracy is within `tol` of dense."""
    return max(s for s, a in zip(curve["sparsity"], curve[scope]) if a >= curve[scope][0] - tol)


def report(speed: list[dict], acc: list[dict], curve: dict, args, n_acc: int) -> str:
    acc_of = {r["name"]: r for r in acc}
    timed = any("speedup" in r for r in speed)
    lines = [(f"Speed: {args.model}, random weights, batch {args.batch}, {args.threads} CPU threads, "
              f"{args.rounds} rounds of (fp32, model) pairs in shuffled order, median of per-pair ratios"
              if timed else "Speed: not measured in this report (no speed part)")
             + f"; torch {torch.__version__}, timm {timm.__version__}. Accuracy: shamail CIFAR-10 ViT on "
             f"{n_acc} CIFAR-10 test JPEGs ({n_acc // 10} per class, the first by file name).", "",
             "| method | bytes (speed model) | GMACs/img | dtype | sparsity | CPU speed vs fp32 | shamail top-1 | "
             "Δ top-1 (points) | shamail vk.save bytes |", "|---|---|---|---|---|---|---|---|---|"]
    dense = acc_of["fp32"]["acc"]
    for r in speed:
        a = acc_of.get(r["name"], {})
        refused = next((x["how"] for x in (r, a) if x.get("how", "").startswith("refused")), None)
        if refused:
            lines.append(f"| {r['name']} | {refused} | | | | | | | |")
            continue
        size = "n/a" if r["name"].startswith("torch.ao") else (  # torch's packed params: not in a state dict
            f"{r['model_bytes'] / 1e6:.1f} MB" if "model_bytes" in r else "-")
        cols = [size, f"{r['gmacs']:.2f}" if "gmacs" in r else "-", r.get("dtype", "-"),
                f"{r['sparsity']:.3f}" if "sparsity" in r else "-",
                f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                f"{a['acc']:.4f}" if "acc" in a else "-", f"{100 * (a['acc'] - dense):+.2f}" if "acc" in a else "-",
                f"{a['save_bytes']:,}" if "save_bytes" in a else "-"]
        lines.append(f"| {r['name']} | " + " | ".join(cols) + " |")
    speed_of = {r["name"]: r.get("speedup") for r in speed}
    if all(speed_of.get(k) for k in ("tome", "int8", "lora (merged) + tome + int8")):
        lines += ["", f"Composition: lora (merged) + tome + int8 runs {speed_of['lora (merged) + tome + int8']:.2f}x "
                  f"fp32; tome alone {speed_of['tome']:.2f}x times int8 alone {speed_of['int8']:.2f}x = "
                  f"{speed_of['tome'] * speed_of['int8']:.2f}x. ToMe r: {TOME_R['vit_base']} on the speed model, "
                  f"{TOME_R['shamail']} on shamail (64 patch tokens)."]
    lines += ["", f"Accuracy vs sparsity (shamail, {curve['n_images']} images; essential sparsity = the largest "
              f"sparsity within 1 point of dense: global {knee(curve, 'global'):.1f}, per layer "
              f"{knee(curve, 'layer'):.1f}; 2:4 {curve['2:4']:.4f}, 4:8 {curve['4:8']:.4f}):", "",
              "| sparsity | " + " | ".join(f"{s:.1f}" for s in curve["sparsity"]) + " |",
              "|---|" + "---|" * len(curve["sparsity"])]
    for scope in ("global", "layer"):
        lines.append(f"| {scope} | " + " | ".join(f"{a:.4f}" for a in curve[scope]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm model of the speed part")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder holding weights/ and data/")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--part", choices=("all", "accuracy", "curve", "sizes", "speed", "report"), default="all",
                    help="run one part (each saves its result; `curve`: the sparsity curve alone; `sizes`: shamail "
                         "sizes without evaluation), or `report` to join the saved parts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.out / "compress_parts"  # each part's result, so the parts may run apart (then --part report)
    parts.mkdir(exist_ok=True)
    if args.part in ("all", "accuracy", "curve", "sizes"):
        print("accuracy (shamail)", flush=True)
        acc, curve = accuracy_part(args)
        (parts / f"{args.part if args.part != 'all' else 'accuracy'}.json").write_text(json.dumps(
            {"accuracy": acc, "curve": curve, "n_images": curve["n_images"], "args": vars(args)}, indent=1,
            default=str))
    if args.part in ("all", "speed"):
        speed = speed_part(args)
        (parts / "speed.json").write_text(json.dumps({"speed": speed, "args": vars(args)}, indent=1, default=str))
    if args.part in ("all", "report"):
        a = json.loads((parts / "accuracy.json").read_text())
        s = json.loads((parts / "speed.json").read_text()) if (parts / "speed.json").is_file() else {
            "speed": [{"name": r["name"], "how": r["how"]} for r in a["accuracy"]], "args": vars(args)}
        if (parts / "curve.json").is_file():  # the curve from its own run (--part curve)
            a["curve"] = json.loads((parts / "curve.json").read_text())["curve"]
        if (parts / "sizes.json").is_file():  # shamail sizes from their own run (--part sizes)
            sizes = {r["name"]: r for r in json.loads((parts / "sizes.json").read_text())["accuracy"]}
            for r in a["accuracy"]:
                r.update({k: v for k, v in sizes.get(r["name"], {}).items() if k.endswith("bytes")})
        args = argparse.Namespace(**{**s["args"], "out": args.out})
        table = report(s["speed"], a["accuracy"], a["curve"], args, a.get("n_images", a["curve"]["n_images"]))
        print(table)
        (args.out / "compress.json").write_text(json.dumps({"speed": s["speed"], "accuracy": a["accuracy"],
                                                            "curve": a["curve"]}, indent=1))
        (args.out / "compress.md").write_text(table + "\n")
        plot(a["curve"], args.out / "compress_sparsity.png")


if __name__ == "__main__":
    main()
