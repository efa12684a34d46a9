"""int8: post-training, calibration-free int8 quantisation of a ViT's Linear layers (torchao or torch.ao).

No paper: tooling (spec ../shared/methods/compress.md B4). Claim: on CPU, dynamic int8 (int8 weights, int8
activations quantised per batch) runs ViT-B/16 several times faster than fp32 at <= 1 point accuracy loss; the
model on disk is about 4x smaller. `benchmarks/compress.py` measures both against fp32 and against
`torch.ao.quantization.quantize_dynamic` itself in one run.

Plugs in at: pattern 1 (the target Linears are replaced or get quantised weights); `patch_embed`, `head`, norms,
tokens, prompts (VPT) and adapters' extra modules stay float; SDPA untouched; nothing trainable afterwards.
Backends (`backend='auto'` picks per device, from the table `AUTO` that `benchmarks/compress.py` decided):
* `torch.ao`: `torch.ao.quantization.quantize_dynamic`, per-channel int8 weights, fbgemm/x86 kernels. Deprecated
  by torch, yet the fastest int8 path in eager mode on CPU (benchmarks/compress.py, ViT-B/16,
  batch 8, 2 threads: 2.31x, equal to quantize_dynamic on every Linear; RESULTS.md "Compression");
* `torchao`: `torchao.quantization.quantize_` with `Int8DynamicActivationInt8WeightConfig` (per-row weights,
  per-token activations), or `Int8WeightOnlyConfig` with `weight_only=True`; its speed comes from CUDA kernels
  and `torch.compile` (eager CPU: 1.24x, weight-only 0.93x in the same run).
Which one ran is recorded in the config (`vk.info`, the save's manifest, bench rows). Quantise last: a method
applied after int8 sees quantised Linears (pruning and adapters refuse them).

Hand-written here, and why: only the plain-tensor state dicts of the quantised layers (`_quant.py`), since
neither library's form goes into safetensors; `vk.save` stores the int8 weights and scales at their real size,
and `vk.load` re-quantises the rebuilt float model and puts the saved integers back (outputs reproduced exactly).
FLOPs of the torch.ao layers are counted as their float Linears (a formula registered with torch's counter).
Docs: docs/compress.md.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from vitkit.registry import register

from . import _common, _quant

_log = logging.getLogger("vitkit")

# backend='auto' per device type: cpu from the measurements above (RESULTS.md "Compression"); cuda from torchao's
# documentation (no GPU was lent to measure it)
AUTO = {"cpu": "torch.ao", "cuda": "torchao"}


@dataclass(frozen=True)
class Config:
    backend: Literal["auto", "torch.ao", "torchao"] = field(default="auto", metadata={
        "help": "auto: the faster path on the model's device (cpu: torch.ao quantize_dynamic, cuda: torchao); "
                "torch.ao: quantize_dynamic (per-channel int8 weights, CPU kernels); torchao: quantize_ (int8 "
                "weights per row, int8 activations per token)"})
    weight_only: bool = field(default=False, metadata={
        "help": "int8 weights, float activations (torchao Int8WeightOnlyConfig; torchao backend only)"})
    targets: tuple[str, ...] = field(default=_common.DEFAULT_TARGETS, metadata={
        "help": "Linears to quantise: qkv, proj, fc1, fc2, mlp, attn, head, or regular expressions over module "
                "names; () quantises nothing"})

    def __post_init__(self):
        if self.weight_only and self.backend == "torch.ao":
            raise ValueError("int8: `weight_only` needs backend='torchao' (torch.ao's dynamic quantisation always "
                             "quantises activations)")


def resolve_backend(model: nn.Module, cfg: Config) -> str:
    """The backend that runs for `cfg` on `model`'s device."""
    if cfg.weight_only:
        return "torchao"
    if cfg.backend != "auto":
        return cfg.backend
    device = next(model.parameters()).device.type
    return AUTO.get(device, "torchao")


def check_quantisable(model: nn.Module, method: str) -> None:
    """Refuse a model that is quantised already."""
    done = _quant.quantised_layers(model)
    if done:
        raise ValueError(f"{method}: {done[0][0]} is quantised already; quantise a float model once")


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    check_quantisable(model, "int8")
    layers = _common.target_layers(model, cfg.targets, "int8") if cfg.targets else []
    non_linear = [n for n, m in layers if not isinstance(m, nn.Linear)]
    if non_linear:
        raise ValueError(f"int8: {non_linear[0]} is not a Linear; int8 quantises Linear layers only")
    backend = resolve_backend(model, cfg)
    if layers and backend == "torch.ao" and next(model.parameters()).device.type != "cpu":
        raise ValueError("int8: backend='torch.ao' runs on CPU only; move the model to the CPU or use "
                         "backend='torchao'")
    if _common.masked_layers(model):  # quantising a parametrised weight would drop the mask: bake it in
        from .prune import make_permanent

        make_permanent(model)
    if layers and backend == "torch.ao":
        _quant.quantize_dynamic_int8(model, layers)
    elif layers:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        _quant.quantize_torchao(model, layers, Int8WeightOnlyConfig() if cfg.weight_only
                                else Int8DynamicActivationInt8WeightConfig())
    _log.info("int8: %d Linear layers quantised with %s", len(layers), backend)
    # record what ran (vk.info, the save's manifest), so that vk.load rebuilds the same form on any device
    model.__dict__["_vitkit_resolved_config"] = dataclasses.replace(cfg, backend=backend)
    return model


register("int8", kind="compress", config=Config, apply=apply, identity={"targets": ()})
