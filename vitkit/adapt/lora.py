"""LoRA: low-rank updates beside frozen Linears, through Hugging Face PEFT, plus the paper's q/v-only update.

Paper: *LoRA: Low-Rank Adaptation of Large Language Models*, Hu et al., ICLR 2022, arXiv:2106.09685.

Claim: a zero-initialised update `y = Wx + b + (alpha/r)·B A drop(x)` on frozen Linears matches full fine-tuning
with ~10,000x fewer trainable parameters and merges away (`W <- W + (alpha/r)·BA`), so inference costs nothing.

Plugs in at: pattern 1 (wrap a Linear; fused SDPA untouched). `targets` take friendly names: `q`, `k`, `v`
(slices of timm's fused `attn.qkv`), `qkv` (the whole fused layer: PEFT's `target_modules=["qkv"]`, one update
shared by q, k and v, *not* the paper's setting), `proj`, `fc1`, `fc2`, `mlp` (= fc1 + fc2), `all-linear` (every
Linear in the blocks), or any regular expression matched in full against module names
(`blocks\\.(10|11)\\.attn\\.qkv`). Trainable: the factors (+ the head).

Hand-written here, and why: everything but the q/k/v slices goes through PEFT's `inject_adapter_in_model`
(keys `...qkv.base_layer.weight`, `...qkv.lora_A.default.weight`; the adapter loads with PEFT's own
`set_peft_model_state_dict`); PEFT's other LoRA options (`use_dora`, `use_rslora`, `init_lora_weights`, ...)
pass through `peft_kwargs`, and `tuner="loha"` / `"lokr"` swaps in PEFT's LoHa / LoKr on the same targets. The paper's q+v update on a *fused* qkv needs one layer, `QKVLoRA`: per chosen
slice `A_s (r x D)`, `B_s (D x r)`; the k rows of its weight delta are exactly zero. It keeps the wrapped Linear
as `base_layer`, so `vk.save` writes only the factors. `merge(model)` folds every LoRA layer into its Linear
(all or nothing) and leaves a plain timm `VisionTransformer`; `merge(model, unload=False)` keeps the layers and
records `merged=True` in the config, so a save then load rebuilds merged layers instead of adding the update
twice. Apply lora before ssf (refused after it).

Differs from the reference: nothing known. Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P1.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.registry import alias, register

from ._common import earlier_trainable, forget, freeze_except, new_modules_follow_mode

_log = logging.getLogger("vitkit")

SLICES = ("q", "k", "v")
FRIENDLY = {  # friendly target -> suffixes of module names
    "qkv": (".attn.qkv",), "proj": (".attn.proj",), "fc1": (".mlp.fc1",), "fc2": (".mlp.fc2",),
    "mlp": (".mlp.fc1", ".mlp.fc2"),
}
RESERVED = {"r": "rank", "lora_alpha": "alpha", "alpha": "alpha", "lora_dropout": "dropout",
            "target_modules": "targets"}


@dataclass(frozen=True)
class Config:
    rank: int = field(default=8, metadata={"help": "rank r of every update"})
    alpha: float = field(default=8.0, metadata={"help": "scale numerator: the update is multiplied by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the low-rank branch"})
    merged: bool = field(default=False, metadata={
        "help": "the layers hold their update merged into the Linear (set by lora.merge(model, unload=False) and "
                "recorded so that vk.save / vk.load keep that state; unmerge clears it)"})
    targets: tuple[str, ...] = field(default=("q", "v"), metadata={
        "help": "q, k, v (slices of the fused qkv; the paper's q+v is the default), qkv (whole fused layer, "
                "via PEFT), proj, fc1, fc2, mlp, all-linear, or regular expressions over module names"})
    peft_kwargs: dict = field(default_factory=dict, metadata={
        "help": "extra peft.LoraConfig options for the PEFT targets, e.g. {'use_dora': True} or "
                "{'use_rslora': True}"})
    tuner: Literal["lora", "loha", "lokr"] = field(default="lora", metadata={
        "help": "PEFT tuner for the PEFT targets: lora, loha (LoHa) or lokr (LoKr); q/k/v slices need lora"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from NOAH's VTAB-1k recipe for LoRA (AdamW, batch 64, "
                "100 epochs; V-PETL Bench uses it too; shared/methods/bench.md §4)"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given; from the same recipe"})

    def __post_init__(self):
        if self.tuner != "lora" and any(t in SLICES for t in self.targets):
            raise ValueError(f"lora: q/k/v slice targets are LoRA layers; with tuner={self.tuner!r} use "
                             "targets such as ('qkv',)")
        if self.tuner != "lora" and self.dropout:
            raise ValueError(f"lora: `dropout` is LoRA's input dropout; with tuner={self.tuner!r} pass "
                             "peft_kwargs={'module_dropout': ...} or {'rank_dropout': ...}")
        if self.rank < 1:
            raise ValueError(f"lora: `rank` must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora: `alpha` must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: `dropout` must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora: `targets` is empty; e.g. targets=('q', 'v') or ('qkv',)")
        slices = [t for t in self.targets if t in SLICES]
        if slices and any(t in ("qkv", "all-linear") for t in self.targets):
            raise ValueError(f"lora: `targets` {self.targets} update the fused qkv twice; use q/k/v slices or "
                             "`qkv`, not both")
        reserved = [k for k in self.peft_kwargs if k in RESERVED]
        if reserved:
            raise ValueError(f"lora: `peft_kwargs` {reserved} are config fields here; use "
                             f"{', '.join(RESERVED[k] for k in reserved)}")
        if self.peft_kwargs and len(slices) == len(self.targets):
            raise ValueError(f"lora: `peft_kwargs` {self.peft_kwargs} only reach PEFT targets (qkv, proj, mlp, "
                             f"...), but targets {self.targets} are all q/k/v slices (vitkit's own layer)")


class QKVLoRA(nn.Module):
    """LoRA on chosen slices of a fused `[q; k; v]` Linear; the other slices' delta is exactly zero.

    `y = base_layer(x) + s·[B_q A_q x; 0; B_v A_v x]` for slices ("q", "v"), `s = alpha / rank`.
    """

    def __init__(self, base_layer: nn.Linear, slices: tuple[str, ...], rank: int, alpha: float, dropout: float):
        super().__init__()
        if base_layer.out_features % 3:
            raise ValueError(f"lora: a fused qkv Linear needs out_features divisible by 3, got "
                             f"{base_layer.out_features}")
        self.base_layer = base_layer
        self.slices = tuple(s for s in SLICES if s in slices)
        self.rank, self.scaling, self.merged = rank, alpha / rank, False
        self.attn_dim = base_layer.out_features // 3  # rows per slice
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.ModuleDict({s: nn.Linear(base_layer.in_features, rank, bias=False, device=dev, dtype=dt)
                                     for s in self.slices})
        self.lora_B = nn.ModuleDict({s: nn.Linear(rank, self.attn_dim, bias=False, device=dev, dtype=dt)
                                     for s in self.slices})
        for s in self.slices:
            nn.init.kaiming_uniform_(self.lora_A[s].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[s].weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked `A (k·r, in)` and block-structured `B (3·attn_dim, k·r)`; unchosen slices' rows are zero."""
        a = torch.cat([self.lora_A[s].weight for s in self.slices])
        k, r = len(self.slices), self.rank
        rows = []
        for s in SLICES:
            if s in self.slices:
                i = self.slices.index(s)
                rows.append(F.pad(self.lora_B[s].weight, (i * r, (k - 1 - i) * r)))
            else:
                rows.append(a.new_zeros(self.attn_dim, k * r))
        return a, torch.cat(rows)

    def delta_weight(self) -> torch.Tensor:
        """`s·BA` of shape (3·attn_dim, in), computed in float32."""
        a, b = self.factors()
        return self.scaling * (b.float() @ a.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.factors()
        return y + self.scaling * F.linear(F.linear(self.lora_dropout(x), a), b)

    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            merged = w.data.float() + self.delta_weight()
            if not torch.isfinite(merged).all():
                raise ValueError("lora: merging would put NaN or inf into the qkv weight; the LoRA factors are "
                                 "not finite")
            w.data = merged.to(w.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.data = (w.data.float() - self.delta_weight()).to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"slices={self.slices}, rank={self.rank}, scaling={self.scaling:g}"


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """Split `targets` into q/k/v slices and the full names of the Linear modules PEFT should wrap."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    slices = tuple(t for t in targets if t in SLICES)
    names: list[str] = []
    for t in targets:
        if t in SLICES:
            continue
        if t in FRIENDLY:
            found = [n for n in linears if n.startswith("blocks.") and n.endswith(FRIENDLY[t])]
        elif t == "all-linear":
            found = [n for n in linears if n.startswith("blocks.")]
        else:
            try:
                pattern = re.compile(t)
            except re.error as err:
                friendly = ", ".join([*SLICES, *FRIENDLY, "all-linear"])
                raise ValueError(f"lora: target `{t}` is neither a friendly name ({friendly}) nor a valid "
                                 f"regular expression ({err})") from None
            found = [n for n in linears if pattern.fullmatch(n)]
        if not found:
            raise ValueError(f"lora: target `{t}` matches no Linear layer; Linear layers are e.g. "
                             f"{', '.join(linears[:6])}")
        names += [n for n in found if n not in names]
    return slices, names


def peft_config(cfg: Config, module_names: list[str]):
    """The PEFT config (`LoraConfig`, `LoHaConfig`, `LoKrConfig`) `apply` uses for the PEFT targets; the same
    config on the same base with PEFT's own API loads the saved adapter."""
    import peft

    if cfg.tuner == "lora":
        return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=module_names, **cfg.peft_kwargs)
    config_cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[cfg.tuner]
    return config_cls(r=cfg.rank, alpha=cfg.alpha, target_modules=module_names, **cfg.peft_kwargs)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LoRA-family layer in `model` (PEFT's tuner layers and `QKVLoRA`), with its name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, QKVLoRA))]


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"lora: needs a timm VisionTransformer, got {type(model).__name__}")
    if lora_layers(model):
        raise ValueError("lora: the model already has LoRA layers; merge them first (vitkit.adapt.lora.merge)")
    keep = earlier_trainable(model)
    wrapped = [(n, m) for n, m in model.named_modules() if n.startswith("blocks.") and hasattr(m, "base_layer")]
    if wrapped:  # e.g. ssf: its wrappers would hide the Linears (and lora inside them could not merge)
        raise ValueError(f"lora: {wrapped[0][0]} is a {type(wrapped[0][1]).__name__}, not a Linear; apply lora "
                         "before methods that wrap Linears (e.g. ssf)")
    slices, names = resolve_targets(model, cfg.targets)
    trained: set[str] = set()
    with new_modules_follow_mode(model):
        if names:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(peft_config(cfg, names), model)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}  # PEFT marked its adapters only
        for block in (model.blocks if slices else []):
            block.attn.qkv = QKVLoRA(block.attn.qkv, slices, cfg.rank, cfg.alpha, cfg.dropout)
    trained |= {f"{n}.{pn}" for n, m in lora_layers(model) if isinstance(m, QKVLoRA)
                for pn, _ in m.named_parameters() if pn.startswith("lora_")}
    freeze_except(model, keep | trained, train_head=cfg.train_head)
    if cfg.merged:  # rebuilt from a save of a merged model: the saved Linear weights hold the update already
        _merge_layers(model)
        for _, layer in lora_layers(model):
            layer._vitkit_merged_at_load = True
    _log.info("lora: rank %d on %s", cfg.rank, ", ".join([*(f"{s} slice" for s in slices), *names[:4]])
              + (" ..." if len(names) > 4 else ""))
    return model


def _merge_layers(model: nn.Module) -> None:
    """Merge every unmerged LoRA layer, all or nothing: on any failure every weight is restored exactly."""
    done = []
    try:
        for _, layer in lora_layers(model):
            if layer.merged:
                continue
            base = layer.base_layer if isinstance(layer, QKVLoRA) else layer.get_base_layer()
            done.append((layer, base, base.weight.data.clone(), None if base.bias is None else base.bias.data.clone()))
            layer.merge() if isinstance(layer, QKVLoRA) else layer.merge(safe_merge=True)
    except Exception:
        for layer, base, weight, bias in done:
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            if isinstance(layer, QKVLoRA):
                layer.merged = False
            else:
                layer.merged_adapters.clear()
        raise


def _record_merged(model: nn.Module, merged: bool) -> None:
    """Keep the `lora` entry of the model's method list in step, so that `vk.save` records the merged state."""
    from vitkit.registry import Applied, applied

    entries = applied(model)
    for i, entry in enumerate(entries):
        if entry.name in NAMES:
            entries[i] = Applied(entry.name, dataclasses.replace(entry.config, merged=merged))


def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its Linear (in float32), all or nothing.

    Args:
        unload: replace each LoRA layer by its merged Linear, leaving a plain timm `VisionTransformer` (the
            `lora` entry leaves the model's method list). False keeps the layers, merged; `unmerge` undoes it.
            The merged state is recorded (`merged=True` in the `lora` config), so `vk.save` then `vk.load`
            rebuilds merged layers and reproduces the outputs instead of adding the update a second time.
    """
    _merge_layers(model)
    if not unload:
        _record_merged(model, True)
        return model
    for name, layer in lora_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer()
                if not isinstance(layer, QKVLoRA) else layer.base_layer)
    model.__dict__.pop("peft_config", None)
    model._modules.pop("peft_config", None)
    for name in NAMES:
        forget(model, name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge(model, unload=False)`: subtract every update from its Linear again."""
    dora = [n for n, m in lora_layers(model) if getattr(m, "_vitkit_merged_at_load", False) and m.merged
            and any(getattr(m, "use_dora", {}).values())]
    if dora:
        raise ValueError(f"lora: cannot unmerge {dora[0]}: a DoRA layer loaded merged has lost the weight norm "
                         "that unmerging needs; save the model before merging to keep an unmergeable copy")
    for _, layer in lora_layers(model):
        layer.unmerge()
    _record_merged(model, False)
    return model


NAMES = ("lora", "lora-qkv")  # the method and its alias, as recorded on a model
register("lora", kind="adapt", config=Config, apply=apply, identity={})
alias("lora-qkv", of="lora", targets=("qkv",))
