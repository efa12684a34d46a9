"""PVP, pre-trained PEFT modules: start a few-shot run from prompts/adapters trained on a labelled source task.

Paper: *PVP: Pre-trained Visual Parameter-Efficient Tuning*, Song et al., 2023, arXiv:2304.13639.

Claim: few-shot parameter-efficient tuning fails mainly because the modules start random; pre-training them on a
labelled source task and initialising the downstream run from them gains +16.08 / +11.52 / +6.36 points mean
accuracy at 1 / 2 / 4 shots on FGVC (ViT-B/16). Measured here (embedded ViT, digits 0–4 → 5–9, 5 seeds,
benchmarks/RESULTS.md): +0.7 / +0.9 / −1.0 points, inside the seed spread: not reproduced at that scale.

Plugs in at: no new module. The recipe is two `vk.fit` runs:

    vk.adapt(source, "vpt", deep=True); vk.fit(source, source_train, out_dir="runs/src")  # writes runs/src/model
    vk.adapt(target, "pvp", init_from="runs/src/model"); vk.fit(target, few_shot_train)

`init_from` is any `vk.save` folder (`vk.fit` writes one into `out_dir/model`). `apply` reads its manifest, applies
the same adaptation methods with the same configs (`chain`) to `model`, then copies every saved tensor the
chain trains (prompts, LoRA/adapter weights, BitFit biases) bit-exactly into it. The head is never transferred:
`model` keeps its own (any class count). The source's backbone must be `model`'s (checked by the digests
`vk.save` recorded; a different backbone is refused, naming the tensors that differ), module shapes must match.
A source that is not a save folder or holds no adaptation method is refused before `model` changes; the checks
that need the built modules (shapes, a whole-model save's backbone values) run after the chain was applied, so
after such a refusal reload the model.
The record on the model keeps the chain and drops `init_from`, so `vk.save` / `vk.load` of the downstream model
need no source folder; with `chain` alone (no `init_from`) the modules start from their own initialisation:
the plain-init baseline PVP is measured against. Composes with later methods as the chain's methods do.

Hand-written here, and why: no library transfers PEFT modules between timm models with different heads; the
tensors move through vitkit's own save format. Differs from the paper: the source task and module are the
user's (the paper uses ImageNet-1k and VPT-deep); no reference code was published.
Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P9.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vitkit.registry import Applied, applied, get, make_config, register

from ._common import base_name, head_parameter_names

_log = logging.getLogger("vitkit")
DEFAULT_CHAIN = '[{"name": "vpt", "config": {"deep": true}}]'


@dataclass(frozen=True)
class Config:
    init_from: str = field(default="", metadata={
        "help": "a vk.save folder of the source run (vk.fit writes out_dir/model): its adaptation methods are "
                "applied and their trained tensors copied; '' starts the `chain` modules from their own init"})
    chain: str = field(default=DEFAULT_CHAIN, metadata={
        "help": "JSON list of {name, config} adaptation methods to build when `init_from` is '' (recorded from "
                "the source after init, so a saved downstream model reloads without the source folder); "
                "default: VPT-deep, the paper's module"})
    source: str = field(default="", metadata={"help": "informational: the folder the modules were initialised "
                                                      "from (filled in by apply)"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from vpt's Config (NOAH's VTAB-1k recipe for VPT, "
                "PVP's module); the paper states none"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})

    def __post_init__(self):
        _parse_chain(self.chain)


def _parse_chain(text: str) -> list[dict]:
    try:
        chain = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"pvp: `chain` must be a JSON list of {{name, config}}, got {text!r} ({err})") from None
    if not isinstance(chain, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                              and isinstance(e.get("config", {}), dict) for e in chain):
        raise ValueError(f"pvp: `chain` must be a JSON list of {{\"name\": ..., \"config\": {{...}}}}, got {text!r}")
    for entry in chain:
        method = get(entry["name"])  # ValueError naming the closest methods for an unknown name
        if method.kind != "adapt" or method.name == "pvp":
            raise ValueError(f"pvp: `chain` holds `{method.name}`, a {method.kind} method; only adaptation "
                             "methods (vpt, lora, adaptformer, bitfit, ...) are pre-trained modules")
    return chain


def _source_chain(methods: list[dict]) -> list[dict]:
    """The adaptation methods of a save's manifest (a pvp entry stands for its own chain)."""
    chain = []
    for entry in methods:
        if entry["name"] == "pvp":
            chain += json.loads(entry["config"]["chain"])
        elif get(entry["name"]).kind == "adapt":
            chain.append({"name": entry["name"], "config": entry["config"]})
    return chain


def _read_source(model: nn.Module, folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(chain, saved tensors) of a vk.save folder, after checking it was made on `model`'s backbone."""
    from safetensors.torch import load_file

    from vitkit.io import MANIFEST, WEIGHTS, check_base_tensors

    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"pvp: `init_from`={str(folder)!r} is not a vk.save folder (no {MANIFEST}); pass "
                                "the folder vk.fit wrote into out_dir/model, or one written by vk.save")
    manifest = json.loads((folder / MANIFEST).read_text())
    chain = _source_chain(manifest["methods"])
    if not chain:
        raise ValueError(f"pvp: {folder} has no adaptation method applied ({[m['name'] for m in manifest['methods']]}"
                         "): nothing to transfer; train the source with a PEFT method (e.g. vpt deep=True)")
    if manifest.get("weights") != "full" and "base_tensors" in manifest:  # the head is never compared
        head = head_parameter_names(model) | {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
        record = {**manifest, "base_tensors": {k: v for k, v in manifest["base_tensors"].items() if k not in head}}
        try:
            check_base_tensors(folder, record, model, set(manifest["tensors"]))
        except ValueError as err:
            raise ValueError(f"pvp: the source modules were trained on another backbone: {err}") from None
    return chain, load_file(str(folder / WEIGHTS))


def _copy_modules(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> int:
    """Copy the saved tensors that `model` trains (head excluded); return how many tensors were copied."""
    head = head_parameter_names(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad and base_name(name) not in head}
    by_base = {base_name(k): v for k, v in saved.items()}
    shapes = [f"{n} {tuple(by_base[base_name(n)].shape)} -> {tuple(p.shape)}" for n, p in params.items()
              if base_name(n) in by_base and by_base[base_name(n)].shape != p.shape]
    if shapes:
        raise ValueError(f"pvp: module shapes in {folder} do not fit this model: {'; '.join(shapes[:3])}; the "
                         "backbone (width, depth, patch size) must be the source's")
    frozen = {base_name(k): v for k, v in model.state_dict().items()
              if base_name(k) not in head and base_name(k) not in {base_name(n) for n in params}}
    differ = sorted(k for k, v in frozen.items() if k in by_base and not torch.equal(by_base[k], v.cpu()))
    if differ:  # a whole save (random-init base): compare the frozen backbone itself
        raise ValueError(f"pvp: the source modules were trained on another backbone: {folder} holds other values "
                         f"for {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} ({len(differ)} tensors); "
                         "load the backbone the source run started from")
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if base_name(name) in by_base:
                p.copy_(by_base[base_name(name)])
                copied += 1
    if not copied:
        raise ValueError(f"pvp: {folder} holds no trained module tensor this model trains; was the source trained?")
    return copied


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    folder = Path(cfg.init_from) if cfg.init_from else None
    chain, saved = _read_source(model, folder) if folder is not None else (_parse_chain(cfg.chain), None)
    if folder is None and cfg.chain == DEFAULT_CHAIN:
        _log.info("pvp: no `init_from`: VPT-deep prompts start from their own init (the plain-init baseline)")
    record, start = applied(model), len(applied(model))
    for entry in chain:  # each sees the ones before (`earlier_trainable`); the lasting record is `chain`
        method = get(entry["name"])
        method_cfg = make_config(method, **entry.get("config", {}))
        model = method.apply(model, method_cfg)
        record.append(Applied(method.name, model.__dict__.pop("_vitkit_resolved_config", method_cfg)))
    del record[start:]
    if saved is not None:
        _log.info("pvp: %d module tensors initialised from %s", _copy_modules(model, saved, folder), folder)
    model.__dict__["_vitkit_resolved_config"] = dataclasses.replace(
        cfg, init_from="", chain=json.dumps(chain), source=str(folder) if folder is not None else cfg.source)
    return model


register("pvp", kind="adapt", config=Config, apply=apply)
