"""The report contract's size columns for a compressed model, and the side-by-side report of `vitkit compress`.

`size_report(model)`: `params` (every weight and bias, quantised ones included, masks and scales not),
`nonzero_params` and the real `sparsity` (zeros over all of them, pruned weights seen through their masks),
`model_bytes` (the whole state dict as one safetensors file: int8 weights at one byte, pruning masks at one bit,
unstructured zeros stored dense), and `dtype` (`float32`, `int8-dynamic(torch.ao)+float32`, ...).
`compare(baseline, model, ...)`: those for both, GMACs (eager attention; quantised layers counted as the float
Linears they replace), and, when asked, `vitkit.bench.perf.compare`'s interleaved latency / throughput / peak
memory and top-1 before and after on a labelled dataset.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import _common, _quant

_SKIP = (".mask", "weight_scale", "weight_zero_point")


def _weights(model: nn.Module):
    """Every weight and bias as the model uses it (masked, or the integers of a quantised layer)."""
    state = model.state_dict()
    masked = {f"{n}.parametrizations.weight.original": m for n, m in _common.masked_layers(model)}
    for key, value in state.items():
        if key.endswith(_SKIP) or not isinstance(value, torch.Tensor):
            continue
        yield key, (masked[key].weight.detach() if key in masked else value)


def size_report(model: nn.Module) -> dict:
    from safetensors.torch import save

    params = nonzero = 0
    for _, tensor in _weights(model):
        params += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    quantised = _quant.quantised_layers(model)
    kinds = sorted({"int8-dynamic(torch.ao)" if not isinstance(m, nn.Linear) else
                    f"{type(m.weight).__name__}(torchao)" for _, m in quantised})
    floats = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return {"params": params, "nonzero_params": nonzero, "sparsity": 1 - nonzero / max(1, params),
            "model_bytes": len(save(state)), "dtype": "+".join(kinds + floats)}


def accuracy(model: nn.Module, data, batch_size: int = 64) -> float:
    """Top-1 of `model` on `data` (`(image, label)` items)."""
    from vitkit.train.evaluate import evaluate

    return evaluate(model, data, protocol="finetuned", batch_size=batch_size)["top1"]


def compare(baseline: nn.Module, model: nn.Module, *, data=None, speed: bool = True, batch: int = 8,
            device: str = "cpu", rounds: int = 5) -> dict:
    """One row of the report contract: `model` against `baseline`, measured in one run (see the module doc)."""
    from vitkit.bench.perf import compare as perf_compare
    from vitkit.info import count_gmacs
    from vitkit.models.layout import token_layout

    layout = token_layout(model)
    size = (layout.in_chans, *layout.img_size)
    row = {**size_report(model), **{f"baseline_{k}": v for k, v in size_report(baseline).items()}}
    row["gmacs"], row["baseline_gmacs"] = count_gmacs(model, size), count_gmacs(baseline, size)
    if speed:
        row.update(perf_compare(baseline, model, batch=batch, device=device, rounds=rounds))
    if data is not None:
        row["baseline_acc"], row["acc"] = accuracy(baseline, data), accuracy(model, data)
        row["delta_acc"] = row["acc"] - row["baseline_acc"]
    if row["sparsity"] > row["baseline_sparsity"] and not any(
            type(m.weight).__name__ == "SparseSemiStructuredTensor" for m in model.modules() if hasattr(m, "weight")):
        row["note"] = (f"{device}: zeros are stored dense and computed; sparsity saves no time on this device "
                       "(2:4 kernels: vitkit.compress.prune.to_semi_structured on CUDA sm80+)")
    return row


def markdown(row: dict, label: str) -> str:
    """The row as a two-column (before | after) Markdown table."""
    def fmt(v: Optional[float], spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"| {label} | before | after |", "|---|---|---|",
             f"| params | {row['baseline_params']:,} | {row['params']:,} |",
             f"| non-zero params | {row['baseline_nonzero_params']:,} | {row['nonzero_params']:,} |",
             f"| sparsity | {row['baseline_sparsity']:.3f} | {row['sparsity']:.3f} |",
             f"| model bytes | {row['baseline_model_bytes']:,} | {row['model_bytes']:,} |",
             f"| dtype | {row['baseline_dtype']} | {row['dtype']} |",
             f"| GMACs / image | {row['baseline_gmacs']:.4f} | {row['gmacs']:.4f} |"]
    if "throughput_ips" in row:
        lines += [f"| images / s (batch {row['batch']}, {row['device']}) | {row['baseline_ips']:.1f} | "
                  f"{row['throughput_ips']:.1f} ({row['speedup']:.2f}x) |",
                  f"| peak memory MiB ({row['mem_kind']}) | {row['baseline_peak_mem_mib']:.1f} | "
                  f"{row['peak_mem_mib']:.1f} |"]
    if "acc" in row:
        lines.append(f"| top-1 | {fmt(row['baseline_acc'], '.4f')} | {fmt(row['acc'], '.4f')} "
                     f"({100 * row['delta_acc']:+.2f} points) |")
    if row.get("note"):
        lines.append(f"| note | | {row['note']} |")
    return "\n".join(lines)
