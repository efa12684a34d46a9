"""PEFT round trip on `vit_small_patch16_224`: vitkit -> PEFT -> logits diff, and PEFT -> vitkit -> logits diff.

Random weights (offline; `pretrained=False`): the conversion does not depend on them. Each adapter is trained a
few AdamW steps on random images and labels so that LoRA's B is not zero (a zero B would hide a wrong mapping),
then saved in the other library's format and loaded by the other library's own loader:

* vitkit -> PEFT: `vk.adapt(base, "lora", ...)`, train, `vk.save(model, dir, format="peft")`,
  `PeftModel.from_pretrained(fresh_base, dir)`; max |logits_peft - logits_vitkit| on a batch.
* PEFT -> vitkit: `get_peft_model(base, LoraConfig(...))`, train, `save_pretrained(dir)`,
  `vk.load(dir, base=fresh_base)`; max |logits_vitkit - logits_peft|.

Also reported: the adapter bytes on disk, the logit change the adapter makes (so a diff of 0 is meaningful), and
the wall time of each save and load.

    python benchmarks/peft_roundtrip.py                 # ~1 min on a 2-core CPU
    python benchmarks/peft_roundtrip.py --out benchmarks/results/peft_roundtrip.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import vitkit as vk  # noqa: E402

VITKIT_CASES = [  # (row label, vk.adapt("lora", ...) config)
    ("vitkit lora q,v r=8 (default)", {}),
    ("vitkit lora q,k,v r=4", {"targets": ("q", "k", "v"), "rank": 4, "alpha": 4.0}),
    ("vitkit lora q,v + mlp r=8", {"targets": ("q", "v", "mlp")}),
    ("vitkit lora qkv r=8 (PEFT layer)", {"targets": ("qkv",)}),
    ("vitkit lora qkv r=8 DoRA", {"targets": ("qkv",), "peft_kwargs": {"use_dora": True}}),
]
PEFT_CASES = [  # (row label, LoraConfig kwargs)
    ("PEFT lora qkv r=8 + head", dict(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])),
    ("PEFT lora qkv,attn.proj,fc1,fc2 r=4 + head", dict(r=4, lora_alpha=8, modules_to_save=["head"],
                                                        target_modules=["qkv", "attn.proj", "fc1", "fc2"])),
    ("PEFT rsLoRA qkv r=16", dict(r=16, lora_alpha=16, target_modules=["qkv"], use_rslora=True)),
]


def make_base(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=args.classes).eval()


def train_steps(model, args) -> None:
    """A few AdamW steps on random data: moves every trainable tensor, as real training would."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for _ in range(args.steps):
        x = torch.randn(args.batch, 3, args.img, args.img, generator=g)
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = torch.randn(8, 3, args.img, args.img, generator=torch.Generator().manual_seed(7))
    base_logits = logits(make_base(args), x)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, cfg) in enumerate(VITKIT_CASES):
            model = vk.adapt(make_base(args), "lora", **cfg)
            train_steps(model, args)
            ref = logits(model, x)
            t0 = time.perf_counter()
            vk.save(model, Path(tmp) / f"v{i}", format="peft")
            t1 = time.perf_counter()
            other = PeftModel.from_pretrained(make_base(args), Path(tmp) / f"v{i}")
            t2 = time.perf_counter()
            rows.append((label, "vitkit -> PEFT (PeftModel.from_pretrained)", (logits(other, x) - ref).abs().max().item(),
                         (ref - base_logits).abs().max().item(), folder_bytes(Path(tmp) / f"v{i}"), t1 - t0, t2 - t1))
            print(rows[-1], flush=True)
        for i, (label, kwargs) in enumerate(PEFT_CASES):
            model = get_peft_model(make_base(args), LoraConfig(**kwargs))
            train_steps(model, args)
            ref = logits(model, x)
            t0 = time.perf_counter()
            model.save_pretrained(Path(tmp) / f"p{i}")
            t1 = time.perf_counter()
            other = vk.load(Path(tmp) / f"p{i}", base=make_base(args))
            t2 = time.perf_counter()
            rows.append((label, "PEFT -> vitkit (vk.load(dir, base=))", (logits(other, x) - ref).abs().max().item(),
                         (ref - base_logits).abs().max().item(), folder_bytes(Path(tmp) / f"p{i}"), t1 - t0, t2 - t1))
            print(rows[-1], flush=True)
    import peft

    lines = [
        f"# PEFT round trip on `{args.model}` (random init, {args.img} px, {args.classes} classes)",
        "",
        "Command: `PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/peft_roundtrip.py --out "
        "benchmarks/results/peft_roundtrip.md`"
        f" ({args.steps} AdamW steps at lr {args.lr} on random batches of {args.batch} per adapter; logits on 8 "
        "random images).",
        f"Machine: {cpu_name()} ({os.cpu_count()} cores, shared), {torch.get_num_threads()} torch thread(s), "
        f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"peft {peft.__version__}, vitkit {vk.__version__}.",
        "",
        "| adapter | direction | max abs logit diff | adapter's logit change | adapter bytes | save s | load s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, direction, diff, change, size, ts, tl in rows:
        lines.append(f"| {label} | {direction} | {diff:.2e} | {change:.3f} | {size:,} | {ts:.2f} | {tl:.2f} |")
    lines += ["", "A diff at or below 1e-5 passes (the acceptance bound); the adapter's change is the max abs "
              "difference between the adapted and the untouched base's logits, so the diff is not trivially 0. Save and "
              "load times are wall times on a shared machine; vitkit's include the digest of every base tensor "
              "(the check that a base is the one the adapter was made on)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
