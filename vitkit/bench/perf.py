"""Cost of a model next to its baseline, measured in one run (bench.md §4, report contract).

Throughput: random input, warm-up, then rounds that alternate baseline and model (A B A B ...), each round at
least `min_iters` iterations and `min_seconds`; the median over rounds is reported with the spread. Memory: the
peak one forward allocates on top of the weights; CUDA `max_memory_allocated` after `reset_peak_memory_stats`;
on CPU, where torch keeps no allocator statistics, the running sum of the profiler's per-op allocations and
frees (`profile_memory=True`), in time order (never compared with CUDA; `mem_kind` says which). FLOPs
(`flops_over`): counted with eager attention on real evaluation images, per image: the mean, minimum and
maximum (input-dependent token methods such as ATS keep a per-image token count). A CUDA out-of-memory error is left to the caller, which halves the batch.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from torch.utils.flop_counter import FlopCounterMode

from vitkit.info import frozen_eval
from vitkit.models.layout import token_layout


def _input(model: nn.Module, batch: int, device: str, input_size=None) -> torch.Tensor:
    if input_size is None:
        layout = token_layout(model)
        input_size = (layout.in_chans, *layout.img_size)
    return torch.randn(batch, *input_size, device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _time_round(model: nn.Module, x: torch.Tensor, min_iters: int, min_seconds: float, device: str) -> float:
    """Images per second over one round."""
    _sync(device)
    start, iters = time.perf_counter(), 0
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        model(x)
        iters += 1
    _sync(device)
    return iters * x.shape[0] / (time.perf_counter() - start)


def peak_memory_mib(model: nn.Module, x: torch.Tensor, device: str) -> tuple[float, str]:
    """Peak memory one forward allocates on top of the weights (MiB), and how it was measured."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(x)
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda-max-allocated"
    # CPU torch keeps no allocator statistics: replay the profiler's per-op allocations and frees in time order
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20, "cpu-profiler-allocations"


@contextmanager
def _quiet_stderr():
    """The profiler's C++ backend prints start/stop lines on file descriptor 2; keep them out of the output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compare(baseline: nn.Module, model: nn.Module, *, batch: int = 8, device: str = "cpu", rounds: int = 5,
            min_iters: int = 10, min_seconds: float = 0.5, warmup: int = 3, input_size=None,
            baseline_input_size=None) -> dict:
    """Throughput, latency, FLOPs and memory of `model` and of `baseline`, interleaved, with ratios. The input
    is random, of `input_size` ((C, H, W) or any sample shape) or, when None, the ViT's own size; the baseline's
    is the same unless `baseline_input_size` is given (an input adapter's model takes other inputs than its RGB
    baseline)."""
    baseline.eval().to(device)
    model.eval().to(device)
    x = _input(model, batch, device, input_size)
    xb = x if baseline_input_size is None else _input(baseline, batch, device, baseline_input_size)
    x1 = x[:1]
    with torch.no_grad():
        for _ in range(warmup):
            baseline(xb), model(x)
    speeds = {"baseline": [], "model": []}
    for _ in range(rounds):
        speeds["baseline"].append(_time_round(baseline, xb, min_iters, min_seconds, device))
        speeds["model"].append(_time_round(model, x, min_iters, min_seconds, device))
    latency = []
    with torch.no_grad():
        for _ in range(max(min_iters, 5)):
            _sync(device)
            start = time.perf_counter()
            model(x1)
            _sync(device)
            latency.append(1000 * (time.perf_counter() - start))
    mem, mem_kind = peak_memory_mib(model, x, device)
    base_mem, _ = peak_memory_mib(baseline, xb, device)
    ips, base_ips = statistics.median(speeds["model"]), statistics.median(speeds["baseline"])
    return {
        "batch": batch, "device": device, "threads": torch.get_num_threads(),
        "throughput_ips": ips, "throughput_spread": [min(speeds["model"]), max(speeds["model"])],
        "baseline_ips": base_ips, "speedup": ips / base_ips,
        "latency_ms_b1": statistics.median(latency),
        "flops_method": "eager-attn",
        "peak_mem_mib": mem, "baseline_peak_mem_mib": base_mem, "mem_ratio": mem / base_mem if base_mem else None,
        "mem_kind": mem_kind,
    }


def _count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates (1e9) of one forward of `x` (all images together), attention on the eager path."""
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        with frozen_eval(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, s in zip(attns, saved):
            m.fused_attn = s
    return counter.get_total_flops() / 2 / 1e9


def flops_over(model: nn.Module, images: torch.Tensor, chunk: int = 64, probe: int = 8) -> dict:
    """GMACs per image over `images` (N, C, H, W): mean, min, max, n and whether they depend on the input.

    Each image is counted alone (a batched count of a per-image token method such as ATS includes the padding
    to the batch's widest image). When the first `probe` images all count the same and a batched count of
    every image equals that too, the count is the same for all (one count stands for all); otherwise every
    image is counted alone."""
    device = next(model.parameters()).device
    images = images.to(device)
    first = [_count_gmacs(model, images[i:i + 1]) for i in range(min(probe, len(images)))]
    if len(set(first)) == 1:
        total = sum(_count_gmacs(model, images[i:i + chunk]) for i in range(0, len(images), chunk))
        if abs(total / len(images) - first[0]) <= 1e-9 * max(1.0, abs(first[0])):
            return {"mean": first[0], "min": first[0], "max": first[0], "n": len(images), "input_dependent": False}
    each = first + [_count_gmacs(model, images[i:i + 1]) for i in range(len(first), len(images))]
    return {"mean": sum(each) / len(each), "min": min(each), "max": max(each), "n": len(images),
            "input_dependent": True}
