"""int4: weight-only int4 quantisation of a ViT's Linear layers through torchao, where its kernels exist.

No paper: tooling (spec ../shared/methods/compress.md B4). Claim: int4 weights (groups of `group_size` along the
input, one bf16 scale and zero point per group) cut the Linear weights 4x against bf16 at a small accuracy cost;
the speed comes from torchao's CUDA tinygemm kernel (`Int4WeightOnlyConfig`, packing `tile_packed_to_4d`).

Plugs in at: pattern 1 (the target Linears' weights become torchao int4 tensors); `patch_embed`, `head`, norms
and tokens stay in the model's dtype. Needs a CUDA GPU and a bf16 model (`model.to('cuda', torch.bfloat16)`):
torchao 0.18 has no int4 kernel for the CPU on this install (its CPU packing needs the `mslk` package), so on
any other device `apply` raises `NotImplementedError` naming the device instead of running a slow emulation.

Hand-written here, and why: nothing but the device check and the plain-tensor state dicts shared with int8
(`_quant.py`: `vk.save` stores the packed int4 data and scales, `vk.load` re-quantises and restores them).
Not run on a GPU in this project yet (none was lent): the CUDA path is torchao's documented one, untested here.
Docs: docs/compress.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitkit.registry import register

from . import _common, _quant
from .int8 import check_quantisable

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    group_size: int = field(default=128, metadata={
        "help": "weights per scale / zero point along the input dimension (torchao: 32, 64, 128 or 256; must "
                "divide every target's input width)"})
    targets: tuple[str, ...] = field(default=_common.DEFAULT_TARGETS, metadata={
        "help": "Linears to quantise: qkv, proj, fc1, fc2, mlp, attn, head, or regular expressions over module "
                "names"})

    def __post_init__(self):
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4: `group_size` must be 32, 64, 128 or 256, got {self.group_size}")


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    check_quantisable(model, "int4")
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        raise NotImplementedError(f"int4: torchao has int4 weight-only kernels for CUDA GPUs only (on this install); "
                                  f"the model is on `{weight.device}`: move it to a GPU in bfloat16, or use int8")
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"int4: torchao's int4 kernel needs a bfloat16 model, got {weight.dtype}; "
                         "call model.to(torch.bfloat16) first")
    layers = _common.target_layers(model, cfg.targets, "int4")
    narrow = [(n, m.in_features) for n, m in layers if m.in_features % cfg.group_size]
    if narrow:
        raise ValueError(f"int4: `group_size` {cfg.group_size} must divide the input width; {narrow[0][0]} has "
                         f"{narrow[0][1]}")
    if _common.masked_layers(model):  # quantising a parametrised weight would drop the mask: bake it in
        from .prune import make_permanent

        make_permanent(model)
    from torchao.quantization import Int4WeightOnlyConfig

    _quant.quantize_torchao(model, layers, Int4WeightOnlyConfig(group_size=cfg.group_size,
                                                                int4_packing_format="tile_packed_to_4d"))
    _log.info("int4: %d Linear layers quantised (torchao, group size %d)", len(layers), cfg.group_size)
    return model


register("int4", kind="compress", config=Config, apply=apply)
