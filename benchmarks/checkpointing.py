"""Training-step cost of gradient checkpointing with each vitkit method, measured in one run.

For every method the same model is trained with `model.set_grad_checkpointing(False)` and `(True)`: time of one
training step (forward + cross-entropy + backward, no optimizer) and peak memory of that step, with the ratios
on / off, and the largest gradient difference between the two (checkpointing must not change gradients).
Token methods are trained with every parameter trainable (as `vitkit train --method tome` does), adapters
with their own trainable set. Timing: `--rounds` rounds; in each the two settings run back to back in random
order, `--steps` steps each; the median over rounds is reported. Memory: CUDA `max_memory_allocated` on GPU;
on CPU the running sum of the profiler's per-op allocations and frees over one step, in time order
(`vitkit.bench.perf`'s method): the peak above what was live before the step.

    python benchmarks/checkpointing.py                         # CPU, writes benchmarks/results/checkpointing.*
    python benchmarks/checkpointing.py --only tome lora --rounds 2
    python benchmarks/checkpointing.py --device cuda --model vit_base_patch16_224 --batch 64 --out checkpointing_cuda
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: waiting OpenMP threads sleep (CPU time is
# measured below, and spinning threads would count)

import argparse
import copy
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit as vk

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # label -> list of (method, config) applied in order
    "full fine-tuning": [],
    "lora (q, v)": [("lora", {})],
    "ssf": [("ssf", {})],
    "bitfit": [("bitfit", {})],
    "adaptformer": [("adaptformer", {})],
    "vpt shallow (10)": [("vpt", dict(num_prompts=10))],
    "vpt deep (10)": [("vpt", dict(num_prompts=10, deep=True))],
    "tome r=8": [("tome", dict(r=8))],
    "evit 0.7": [("evit", dict(keep_rate=0.7))],
    "ats": [("ats", {})],
    "gtp P=8": [("gtp", dict(num_prop=8))],
    "vpt deep + tome": [("vpt", dict(num_prompts=10, deep=True)), ("tome", dict(r=8))],
}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _zero(model):
    for p in model.parameters():
        p.grad = None


def time_steps(model, x, y, steps, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step. On a shared CPU the CPU time is the robust one: it does
    not count the time other processes hold the cores."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(model, x, y)
        _zero(model)
    _sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def peak_memory_mib(model, x, y, device) -> tuple[float, str]:
    _zero(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        _zero(model)
        return peak / 2**20, "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    from vitkit.bench.perf import _quiet_stderr

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, x, y)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    _zero(model)
    return peak / 2**20, "cpu profiler allocations"


def grad_diff(off, on, x, y) -> float:
    torch.manual_seed(0)
    step(off, x, y)
    torch.manual_seed(0)
    step(on, x, y)
    diffs = [(a.grad - b.grad).abs().max().item() for a, b in zip(off.parameters(), on.parameters())
             if a.grad is not None]
    _zero(off), _zero(on)
    return max(diffs) if diffs else float("nan")


def build(base, recipe, device):
    model = copy.deepcopy(base)
    for name, cfg in recipe:
        vk.apply(model, name, **cfg)
    return model.to(device).train()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="method labels starting with these words")
    ap.add_argument("--out", default="checkpointing", help="file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    base = vk.load(args.model, pretrained=False, img_size=args.img_size, num_classes=10)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows = []
    for label, recipe in METHODS.items():
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        off = build(base, recipe, args.device)
        on = copy.deepcopy(off)
        on.set_grad_checkpointing(True)
        diff = grad_diff(off, on, x, y)
        for m in (off, on):  # warm-up
            time_steps(m, x, y, 1, args.device)
        times = {"off": [], "on": []}
        for _ in range(args.rounds):
            order = ["off", "on"]
            random.shuffle(order)
            for k in order:
                times[k].append(time_steps(off if k == "off" else on, x, y, args.steps, args.device))
        mem_off, kind = peak_memory_mib(off, x, y, args.device)
        mem_on, _ = peak_memory_mib(on, x, y, args.device)
        clock = 0 if args.device.startswith("cuda") else 1  # GPU: wall time; CPU: process CPU time
        t_off = statistics.median(t[clock] for t in times["off"])
        t_on = statistics.median(t[clock] for t in times["on"])
        wall_ratio = statistics.median(t[0] for t in times["on"]) / statistics.median(t[0] for t in times["off"])
        trainable = sum(p.numel() for p in off.parameters() if p.requires_grad)
        row = dict(method=label, recipe=recipe, trainable=trainable, grad_mib=4 * trainable / 2**20, step_s_off=t_off, step_s_on=t_on,
                   time_ratio=t_on / t_off, wall_ratio=wall_ratio, clock="wall" if clock == 0 else "process CPU",
                   peak_mib_off=mem_off, peak_mib_on=mem_on, mem_ratio=mem_on / mem_off,
                   mem_kind=kind, max_grad_diff=diff)
        rows.append(row)
        print(f"{label:22s} step {t_off:.3f}s -> {t_on:.3f}s ({t_on / t_off:.2f}x)  peak {mem_off:.0f} -> "
              f"{mem_on:.0f} MiB ({mem_on / mem_off:.2f}x)  max |grad diff| {diff:.1e}", flush=True)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{platform.processor() or platform.machine()}, {args.threads} CPU threads")
    header = (f"{args.model}, random weights, {args.img_size}px, batch {args.batch}, fp32, {device}; training step "
              f"= forward + cross-entropy + backward; median of {args.rounds} rounds x {args.steps} steps "
              f"({'wall' if args.device.startswith('cuda') else 'process CPU'} time per step); memory: "
              f"{rows[0]['mem_kind'] if rows else ''}; torch {torch.__version__}, timm "
              f"{__import__('timm').__version__}")
    lines = [header, "", "Peak memory includes the parameter gradients (`grads`, fp32), which checkpointing cannot "
             "save: with every parameter trainable they dominate on a small model and batch.", "",
             "| method | trainable | grads (MiB) | step off (s) | step on (s) | time on/off | wall on/off | "
             "peak off (MiB) | peak on (MiB) | memory on/off | max grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['grad_mib']:.0f} | {r['step_s_off']:.3f} | "
                     f"{r['step_s_on']:.3f} | "
                     f"{r['time_ratio']:.2f}x | {r['wall_ratio']:.2f}x | {r['peak_mib_off']:.0f} | {r['peak_mib_on']:.0f} | "
                     f"{r['mem_ratio']:.2f}x | {r['max_grad_diff']:.1e} |")
    command = "python benchmarks/checkpointing.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines += ["", f"Command: `{command.strip()}` (from the repository root; {platform.platform()}, "
                  f"{torch.get_num_threads()} torch threads)."]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(dict(args=vars(args), header=header, rows=rows), indent=1))
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
