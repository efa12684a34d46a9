"""Post-training quantisation of target Linears through the two maintained paths, and their state dicts.

* `torchao`: `torchao.quantization.quantize_` with a config (`Int8DynamicActivationInt8WeightConfig`,
  `Int8WeightOnlyConfig`, `Int4WeightOnlyConfig`): the weight becomes a torchao tensor subclass.
* `torch.ao`: `torch.ao.quantization.quantize_dynamic` with per-channel int8 weights (fbgemm / x86 kernels):
  each Linear becomes `torch.ao.nn.quantized.dynamic.Linear`. Deprecated by torch, but the fastest int8 on CPU.

State dicts: neither form goes into safetensors (packed-parameter tuples, `torch.dtype` entries, tensor
subclasses), so each quantised layer gets a state-dict hook writing plain tensors, `<layer>.weight_<part>`
(int8 `qdata` / `int`, float `scale`, `zero_point`) and a load pre-hook turning them back. `vk.save` thus stores
the integer weights at their real size, and `vk.load` (which re-applies the method to the float model it
rebuilt, then loads the saved tensors) restores exactly the saved integers and scales.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

_log = logging.getLogger("vitkit")


# ------------------------------------------------------------------------------------------------- torchao
def quantize_torchao(model: nn.Module, layers: list[tuple[str, nn.Module]], config) -> None:
    """`torchao.quantization.quantize_(model, config)` on `layers` only; hooks for plain-tensor state dicts."""
    from torchao.quantization import quantize_

    chosen = {id(m) for _, m in layers}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    _count_flops(torch.ops.aten._int_mm, _int_mm_flops)
    for _, module in layers:
        module._register_state_dict_hook(_torchao_save)
    _install_load_hook(model)


def _torchao_save(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    weight = state.pop(prefix + "weight")
    names, _ = weight.__tensor_flatten__()
    for name in names:
        state[f"{prefix}weight_{name}"] = getattr(weight, name).detach()


def _torchao_load(module: nn.Module, state: dict, prefix: str, *args) -> None:
    current = module.weight
    names, meta = current.__tensor_flatten__()
    if not any(f"{prefix}weight_{n}" in state for n in names):
        return
    inner = {n: state.pop(f"{prefix}weight_{n}", getattr(current, n)) for n in names}
    state[prefix + "weight"] = type(current).__tensor_unflatten__(inner, meta, current.shape, current.stride())


# ------------------------------------------------------------------------------------------------ torch.ao
def quantize_dynamic_int8(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """`torch.ao.quantization.quantize_dynamic` (qint8, per-channel weights) on `layers` only."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch's multi-line deprecation notice, once per call; logged once below
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name, _ in layers}, dtype=torch.qint8,
                         inplace=True)
    _log.debug("int8: torch.ao.quantization.quantize_dynamic (deprecated by torch; the fastest int8 on CPU)")
    _count_flops(torch.ops.quantized.linear_dynamic, _linear_dynamic_flops)
    modules = dict(model.named_modules())
    for name, _ in layers:
        modules[name]._register_state_dict_hook(_dynamic_save)
    _install_load_hook(model)


_FLOP_FORMULAS: set = set()


def _count_flops(op, formula) -> None:
    """Teach torch's `FlopCounterMode` an integer op (it counts float ops only), once per process: quantised
    models then report the FLOPs of their float graph, as the report contract asks."""
    from torch.utils.flop_counter import register_flop_formula

    if op not in _FLOP_FORMULAS:
        register_flop_formula(op)(formula)
        _FLOP_FORMULAS.add(op)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """`aten._int_mm` (torchao's int8 x int8 matmul): 2·m·k·n, as the float mm it replaces."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _linear_dynamic_flops(x_shape, packed, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `quantized::linear_dynamic` as of the float Linear it replaces (2·tokens·in·out)."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    return 2 * tokens * x_shape[-1] * out_shape[-1]


_DYNAMIC_KEYS = ("scale", "zero_point", "_packed_params.dtype", "_packed_params._packed_params")


def _dynamic_save(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    for key in _DYNAMIC_KEYS:
        state.pop(prefix + key, None)
    weight, bias = module._weight_bias()
    state[prefix + "weight_int"] = weight.int_repr()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        state[prefix + "weight_scale"] = weight.q_per_channel_scales()
        state[prefix + "weight_zero_point"] = weight.q_per_channel_zero_points()
    else:
        state[prefix + "weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        state[prefix + "weight_zero_point"] = torch.tensor([weight.q_zero_point()])
    if bias is not None:
        state[prefix + "bias"] = bias.detach()


def _dynamic_load(module: nn.Module, state: dict, prefix: str, *args) -> None:
    if prefix + "weight_int" not in state and prefix + "bias" not in state:
        return
    current, current_bias = module._weight_bias()
    ints = state.pop(prefix + "weight_int", None)
    scale = state.pop(prefix + "weight_scale", None)
    zero_point = state.pop(prefix + "weight_zero_point", None)
    weight = current
    if ints is not None:
        if current.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            weight = torch._make_per_channel_quantized_tensor(ints, scale.double(), zero_point.long(), 0)
        else:
            weight = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zero_point[0]))
    bias = state.pop(prefix + "bias", current_bias)
    # the keys torch's own loader reads: its current layout when the state dict carries torch's version
    # metadata (model.state_dict() in memory), the version-1 layout otherwise (a safetensors file)
    version = ((getattr(state, "_metadata", None) or {}).get(prefix[:-1]) or {}).get("version")
    state[prefix + "scale"] = torch.tensor(1.0)
    state[prefix + "zero_point"] = torch.tensor(0, dtype=torch.long)
    if version is None or version == 1:
        state[prefix + "weight"], state[prefix + "bias"] = weight, bias
    else:
        state[prefix + "_packed_params.dtype"] = torch.qint8
        state[prefix + "_packed_params._packed_params"] = (weight, bias)


def _install_load_hook(model: nn.Module) -> None:
    """One load pre-hook on the root (torch.ao's Linear reads its keys before its own pre-hooks would run)."""
    if not model.__dict__.get("_vitkit_quant_load_hook"):
        model._register_load_state_dict_pre_hook(_load_quantised, with_module=True)
        model.register_load_state_dict_post_hook(_after_load)
        model.__dict__["_vitkit_quant_load_hook"] = True


def _after_load(model: nn.Module, incompatible) -> None:
    """torch.ao's Linear takes its `version` from the state dict's metadata (none in a safetensors file) and
    with version None skips `reduce_range`, changing outputs: keep the current version."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for _, module in quantised_layers(model):
        if isinstance(module, DynamicLinear):
            module.version = type(module)._version


def _load_quantised(model: nn.Module, state: dict, prefix: str, *args) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, module in quantised_layers(model):
        load = _dynamic_load if isinstance(module, DynamicLinear) else _torchao_load
        load(module, state, f"{prefix}{name}.")


def quantised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear quantised by either path."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicLinear) or
            (isinstance(m, nn.Linear) and type(m.weight).__module__.startswith("torchao"))]
