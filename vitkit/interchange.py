"""PEFT adapter folders both ways: `vk.save(model, dir, format="peft")` and `vk.load(peft_dir, base=...)`.

A PEFT adapter folder is `adapter_config.json` (a `peft.LoraConfig`, or LoHa / LoKr) + `adapter_model.safetensors`
(keys `base_model.model.<module>.lora_A.weight`, ...), read by PEFT's own `PeftModel.from_pretrained(base, dir)`.

vitkit's default LoRA (the paper's q + v update on timm's *fused* `attn.qkv`) has no PEFT layer of its own, but it
is exactly a PEFT LoRA on `qkv` of rank k·r (k = number of slices) with block-structured factors:
`A = [A_q; A_v]` (k·r x D) and `B` (3D x k·r) holding `B_q` in the q rows / first r columns, `B_v` in the v rows /
last r columns, zeros elsewhere (`QKVLoRA.factors`). PEFT scales by `lora_alpha / r`, so the exported config
says `r = k·rank`, `lora_alpha = k·alpha`: the same `alpha / rank`. A trained head is saved through PEFT's
`modules_to_save=["head"]`. LoRA on PEFT targets (`qkv`, `proj`, `mlp`, regexes; DoRA, rsLoRA, LoHa, LoKr) is
PEFT's own layer and is written with PEFT's `get_peft_model_state_dict`.

Methods without a PEFT form (VPT, SSF, AdaptFormer, BitFit, full fine-tuning, token and compression methods) and
merged LoRA are refused with an error that names them. Reading a PEFT folder builds the base, applies vitkit's
`lora` with the folder's targets, rank, alpha and options, and loads the tensors with PEFT's
`set_peft_model_state_dict`. Docs: docs/interchange.md.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import registry

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE = "vitkit_base.json"  # vitkit's note beside the adapter: the digest of every base tensor it relies on
PREFIX = "base_model.model."
PEFT_FORM = {"lora", "lora-qkv"}  # methods with a PEFT adapter form
HEAD_ONLY = {"linear"}  # methods whose only tensors are the head, saved as modules_to_save
TUNERS = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
SUPPORTED_FIELDS = {"use_dora", "use_rslora", "lora_bias", "rank_pattern", "alpha_pattern"}


def save_peft(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model`'s LoRA adapter (and trained head) as a PEFT adapter folder; see the module docstring."""
    from safetensors.torch import save_file

    from .adapt import lora
    from .io import changed_state, write_folder
    from .models.loading import unsaved_hashes

    entries = registry.applied(model)
    other = [a.name for a in entries if a.name not in PEFT_FORM | HEAD_ONLY]
    if other:
        raise NotImplementedError(
            f"vk.save(format='peft'): method(s) {', '.join(other)} have no PEFT adapter form (a PEFT folder holds "
            "a LoRA, LoHa or LoKr adapter and a trained head only; see docs/interchange.md); save with "
            "vk.save(model, path) in vitkit's format")
    lora_entries = [a for a in entries if a.name in PEFT_FORM]
    if not lora_entries:
        raise ValueError("vk.save(format='peft'): the model has no LoRA adapter (methods applied: "
                         f"{', '.join(a.name for a in entries) or 'none'}); apply vk.adapt(model, 'lora') first")
    cfg = lora_entries[0].config
    layers = lora.lora_layers(model)
    merged = [n for n, m in layers if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"vk.save(format='peft'): the LoRA layers are merged into their Linears ({merged[0]}, ...): "
                         "a PEFT adapter is the unmerged factors; call vitkit.adapt.lora.unmerge(model) first, or "
                         "save the merged model with vk.save(model, path)")
    slices = {n: m for n, m in layers if isinstance(m, lora.QKVLoRA)}
    peft_layers = [n for n, m in layers if not isinstance(m, lora.QKVLoRA)]
    state = model.state_dict()
    head_keys = [k for k in state if k.startswith("head.")]
    adapter_keys = {k for k in state if any(k.startswith(f"{n}.") and k[len(n) + 1:].split(".")[0] != "base_layer"
                                            for n in [*slices, *peft_layers])}
    if model.__dict__.get("_vitkit_base_hashes") is not None:
        changed = set(changed_state(model)[0])
        stray = sorted(k for k in changed - adapter_keys if not k.startswith("head."))
        if stray:
            raise NotImplementedError(
                f"vk.save(format='peft'): tensors outside the LoRA factors and the head changed ({', '.join(stray[:4])}"
                f"{' ...' if len(stray) > 4 else ''}), which a PEFT adapter cannot hold; save with vk.save(model, path)")
        with_head = any(k in changed for k in head_keys)
    else:  # a random-initialised base: what is trainable is what PEFT must carry
        with_head = any(p.requires_grad for p in model.head.parameters())

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in slices.items():
        a, b = layer.factors()
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
    if peft_layers:
        from peft.utils import get_peft_model_state_dict

        sub = {k: v for k, v in state.items() if not any(k.startswith(f"{n}.") for n in slices)}
        tensors.update({PREFIX + k: v for k, v in get_peft_model_state_dict(model, state_dict=sub).items()})
    if with_head:
        tensors.update({PREFIX + k: state[k] for k in head_keys})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    k = len(next(iter(slices.values())).slices) if slices else 0  # slices per fused qkv (q, v: 2)
    peft_cfg = lora.peft_config(cfg, sorted([*peft_layers, *slices], key=_natural))
    if slices and not peft_layers:  # only the fused q/v update: one rank-(k·r) LoRA on every qkv
        peft_cfg.r, peft_cfg.lora_alpha = k * cfg.rank, k * cfg.alpha
    elif slices:
        peft_cfg.rank_pattern = {**peft_cfg.rank_pattern, r"attn\.qkv": k * cfg.rank}
        peft_cfg.alpha_pattern = {**peft_cfg.alpha_pattern, r"attn\.qkv": k * cfg.alpha}
    peft_cfg.modules_to_save = ["head"] if with_head else None
    peft_cfg.inference_mode = True
    base = model.__dict__.get("_vitkit_base") or {}
    if base.get("pretrained") or base.get("kind") == "file":  # a random or unknown base cannot be named
        peft_cfg.base_model_name_or_path = base.get("name") or base.get("path")
    note = {"base": base, "base_tensors": unsaved_hashes(state, {k[len(PREFIX):] for k in tensors} | adapter_keys)}

    def write_config(tmp: str) -> None:
        peft_cfg.save_pretrained(str(Path(tmp).parent))  # PEFT's own serialiser writes adapter_config.json

    return write_folder(path, {WEIGHTS: lambda tmp: save_file(tensors, tmp), CONFIG: write_config,
                               BASE: lambda tmp: Path(tmp).write_text(json.dumps(note, indent=2, default=str))})


def load_peft(path: str | os.PathLike, base: Any = None, **load_kwargs) -> nn.Module:
    """Read a PEFT adapter folder onto `base` (a name, file or module; default: the folder's
    `base_model_name_or_path`) as vitkit's `lora`, so the result is a vitkit model (`vk.save`, `vk.info`, ...)."""
    from .models import loading

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    peft_type = config.get("peft_type")
    if peft_type not in TUNERS:
        raise NotImplementedError(f"{path}: PEFT type {peft_type!r} has no vitkit form; vitkit reads "
                                  f"{', '.join(TUNERS)} adapters")
    for key, unsupported in (("exclude_modules", None), ("layers_to_transform", None), ("layers_pattern", None),
                             ("target_parameters", None), ("trainable_token_indices", None)):
        if config.get(key) not in (unsupported, [], {}):
            raise NotImplementedError(f"{path}: `{key}` = {config[key]!r} is not supported by vitkit's reader; "
                                      "load it with PEFT's PeftModel.from_pretrained")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{path}: `bias` = {config['bias']!r} (trained base biases) is not supported; "
                                  "load it with PEFT's PeftModel.from_pretrained")
    to_save = config.get("modules_to_save") or []
    if any(m != "head" for m in to_save):
        raise NotImplementedError(f"{path}: modules_to_save {to_save}: vitkit reads a trained `head` only")
    tensors = _read_tensors(path)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    head = {k: tensors.pop(k) for k in list(tensors) if k.startswith("head.")}

    if isinstance(base, nn.Module):
        if registry.applied(base):
            raise ValueError(f"vk.load({str(path)!r}, base=...): the base already has methods applied "
                             f"({', '.join(a.name for a in registry.applied(base))}); pass the model before adaptation")
        model = copy.deepcopy(base)
    else:
        source = base if base is not None else config.get("base_model_name_or_path")
        if not source:
            raise ValueError(f"{path}: the adapter does not name its base (base_model_name_or_path is empty); pass "
                             f"it: vk.load({str(path)!r}, base='vit_small_patch16_224.augreg_in21k' or a model)")
        if "head.weight" in head and "num_classes" not in load_kwargs:
            load_kwargs["num_classes"] = head["head.weight"].shape[0]
        model = loading.load(source, **load_kwargs)
    if (path / BASE).is_file():  # written by vitkit: refuse a base other than the one the adapter was made on
        from .io import check_base_tensors

        check_base_tensors(path, json.loads((path / BASE).read_text()), model,
                           saved={*tensors, *head})
    if head and model.head.weight.shape != head["head.weight"].shape:
        raise ValueError(f"{path}: the adapter's head is {tuple(head['head.weight'].shape)} but the base's is "
                         f"{tuple(model.head.weight.shape)}; build the base with num_classes="
                         f"{head['head.weight'].shape[0]}")

    targets = config["target_modules"]
    targets = (targets,) if isinstance(targets, str) else tuple(rf"(.*\.)?{re.escape(t)}"
                                                                for t in sorted(targets, key=_natural))
    peft_kwargs = {k: config[k] for k in SUPPORTED_FIELDS if config.get(k) not in (None, False, {})}
    fields: dict[str, Any] = dict(rank=config["r"], targets=targets, peft_kwargs=peft_kwargs,
                                  tuner=TUNERS[peft_type], train_head=bool(head))
    if peft_type == "LORA":
        fields.update(alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0))
    else:
        fields.update(alpha=float(config.get("alpha", config["r"])))
        extra = {k: config[k] for k in ("rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both",
                                        "decompose_factor") if config.get(k) not in (None, False, 0, 0.0, -1)}
        fields["peft_kwargs"] = {**peft_kwargs, **extra}
    registry.apply(model, "lora", **fields)

    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k or "hada_" in k or "lokr_" in k]
    modules = dict(model.named_modules())
    others = sorted({m for k in unexpected if (m := re.sub(r"\.(lora_\w+|hada_\w+|lokr_\w+)(\..*)?$", "", k)) in modules
                     and not isinstance(modules[m], nn.Linear)})
    if others:
        raise NotImplementedError(f"{path}: the adapter targets {', '.join(others[:3])} "
                                  f"({type(modules[others[0]]).__name__}), which vitkit's lora does not wrap (it "
                                  "wraps Linear layers); load it with PEFT's PeftModel.from_pretrained, or target "
                                  "the Linears only (e.g. 'attn.proj' instead of 'proj', which also matches "
                                  "patch_embed.proj)")
    if unexpected or missing:
        raise ValueError(f"{path}: the adapter's tensors do not fit the base: unexpected {unexpected[:4]} "
                         f"({len(unexpected)}), missing {missing[:4]} ({len(missing)})")
    if head:
        model.head.load_state_dict({k[len("head."):]: v for k, v in head.items()})
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no {WEIGHTS} (or adapter_model.bin) beside {CONFIG}")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def peft_form(name: str) -> Optional[str]:
    """How method `name` travels to PEFT: 'lora' (an adapter), 'head' (modules_to_save) or None (vitkit only)."""
    return "lora" if name in PEFT_FORM else "head" if name in HEAD_ONLY else None
