"""PEFT cost benchmark: every adaptation method against PEFT's own LoRA (r = 8 on qkv), measured in one run.

For `vit_small_patch16_224` (random weights: cost does not depend on them), batch 8, AdamW:
trainable parameters, adapter bytes on disk (`vk.save` on a fingerprinted base; PEFT: its adapter state dict +
head as safetensors), training step time (median over interleaved rounds, so drift in a shared machine's load
hits every method alike), training memory, and inference time (after merging, for the mergeable methods)
against the untouched base model.

Training memory is counted, not sampled (CPU torch has no peak-memory counter): parameters + gradients + AdamW
state + the tensors autograd saves for backward (deduplicated by storage), i.e. what one training step holds.

    python benchmarks/peft_speed.py                     # ~5 min on a 2-core CPU (one torch thread)
    python benchmarks/peft_speed.py --model vit_base_patch16_224 --batch 64 --device cuda --bf16   # GPU run
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the `peft` package: run as a script, its folder must not shadow the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import timm
import torch
import torch.nn.functional as F

import vitkit as vk
from vitkit.adapt import lora, ssf

METHODS = [  # (row label, vitkit method, config)
    ("linear", "linear", {}),
    ("full", "full", {}),
    ("bitfit", "bitfit", {}),
    ("lora q,v r=8", "lora", {}),
    ("lora qkv r=8", "lora", {"targets": ("qkv",)}),
    ("lora all-linear r=8", "lora", {"targets": ("all-linear",)}),
    ("lora qkv r=8 dora", "lora", {"targets": ("qkv",), "peft_kwargs": {"use_dora": True}}),
    ("adaptformer d=64", "adaptformer", {}),
    ("vpt n=5", "vpt", {}),
    ("vpt-deep n=5", "vpt", {"deep": True}),
    ("ssf", "ssf", {}),
]
MERGE = {"lora": lora.merge, "ssf": ssf.merge}


def training_memory(model, x, y) -> int:
    """Bytes held by one training step: params + grads + AdamW state (2 per trainable) + saved activations."""
    seen, saved = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + 3 * trainable + saved[0]


def adapter_bytes(model, tmp: Path, label: str) -> int:
    with torch.no_grad():  # move what trains so that vk.save has something to write
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3)
    path = vk.save(model, tmp / label.replace(" ", "_").replace(",", ""))
    return (path / "weights.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import inject_adapter_in_model, get_peft_model_state_dict, LoraConfig
    from safetensors.torch import save_file

    dev = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="vitkit-peft-bench-"))
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10)
    save_file(base.state_dict(), str(tmp / "base.safetensors"))
    size = base.default_cfg["input_size"][1:]
    x = torch.randn(args.batch, 3, *size, device=dev)
    y = torch.arange(args.batch, device=dev) % 10

    rows = {}
    # the reference: PEFT's own LoRA on the fused qkv of a plain timm model, head trainable
    ref = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"]), ref)
    ref.head.requires_grad_(True)
    peft_state = {**get_peft_model_state_dict(ref), **{f"head.{k}": v for k, v in ref.head.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in peft_state.items()}, str(tmp / "peft.safetensors"))
    rows["PEFT LoRA qkv r=8 (reference)"] = dict(model=ref.to(dev), bytes=(tmp / "peft.safetensors").stat().st_size)
    for label, name, cfg in METHODS:
        model = vk.load(tmp / "base.safetensors", arch=args.model)
        vk.adapt(model, name, **cfg)
        rows[label] = dict(model=model.to(dev), bytes=adapter_bytes(model, tmp, label), method=name)
        print(f"built {label}", file=sys.stderr, flush=True)
    for row in rows.values():
        m = row["model"].train()
        row["trainable"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
        row["memory"] = training_memory(m, x, y)
        row["opt"] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        row["times"] = []

    def step(row) -> float:
        m, opt = row["model"], row["opt"]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for row in rows.values():
        step(row)  # warm-up
    for i in range(args.rounds):
        print(f"training round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for row in rows.values():
            row["times"].append(step(row))

    # inference: the untouched base vs each method (merged where it merges), interleaved rounds
    plain = base.to(dev).eval()
    infer = {"base": plain}
    for label, row in rows.items():
        m = row["model"].eval()
        merge = MERGE.get(row.get("method"))
        infer[label] = merge(m) if merge else m
    times = {k: [] for k in infer}

    @torch.no_grad()
    def forward(m) -> float:
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            m(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for m in infer.values():
        forward(m)
    for _ in range(args.rounds):
        for k, m in infer.items():
            times[k].append(forward(m))
    base_t = statistics.median(times["base"])

    r = rows["PEFT LoRA qkv r=8 (reference)"]
    r_step, r_mem = statistics.median(r["times"]), r["memory"]
    print(f"{args.model}, batch {args.batch}, {args.device}{' bf16' if args.bf16 else ''}, torch threads "
          f"{torch.get_num_threads()}; ratios to PEFT LoRA (r=8, qkv) of this run: step "
          f"{1000 * r_step:.0f} ms, memory {r_mem / 2**20:.0f} MiB, {r['trainable']:,} trainable, "
          f"{r['bytes'] / 1024:.0f} KiB; base inference {1000 * base_t:.0f} ms\n")
    print("| method | trainable | x PEFT | adapter KiB | x PEFT | train step x PEFT | train memory x PEFT "
          "| inference x base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        merged = " (merged)" if MERGE.get(row.get("method")) else ""
        print(f"| {label} | {row['trainable']:,} | {row['trainable'] / r['trainable']:.2f} | "
              f"{row['bytes'] / 1024:,.0f} | {row['bytes'] / r['bytes']:.2f} | "
              f"{statistics.median(row['times']) / r_step:.2f} | {row['memory'] / r_mem:.2f} | "
              f"{statistics.median(times[label]) / base_t:.2f}{merged} |")


if __name__ == "__main__":
    main()
