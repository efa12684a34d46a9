"""Sparse then Prune: fine-tune with an attention regulariser, then prune by global magnitude.

Paper: *Sparse then Prune: Toward Efficient Vision Transformers*, Prasetyo, Yudistira, Widodo, 2023,
arXiv:2307.11988.

Claim: fine-tuning with the "sparse regularisation" `CE + λ·mean log(1 + A²)` of the attention probabilities `A`
before global magnitude pruning beats pruning the plainly fine-tuned model (+0.568 % CIFAR-10, +1.764 %
CIFAR-100, +0.256 % ImageNet-100 at pruning ratio 0.1). `benchmarks/compress_structured.py` compares both at equal
sparsity on the embedded model adapted to digits (no sign asserted).

Plugs in at: a loss term (`vitkit.train.fit.add_loss`: `vk.fit` adds `fn(model, images, logits, targets)` to the
task loss) computed from each regularised block's `q` and `k` (forward hooks on timm's `attn.q_norm` /
`attn.k_norm`, which every block calls, Identity or not): `A = softmax(q kᵀ/√d)` is recomputed from them, so
the forward keeps fused SDPA. What trains is what methods made trainable (`vk.adapt(model, "full")` for the
paper's fine-tune). Then `finish(model)` prunes through `prune` (Essential Sparsity's module:
`scope='global'`, `sparsity`, `targets`), removes the regulariser and records it, so `vk.load` rebuilds the
pruned model without it. `weight=0` adds exactly zero: training equals plain training step for step.

Differs from the reference, and why: the paper states the regulariser for the transformer's self-attention;
its code (`Encoder.forward`) overwrites the value in every layer, so only the **last** block is regularised:
`blocks='all'` (default; mean over blocks) follows the paper, `blocks='last'` the reference. Both use
`log(1 + A²)` of the probabilities, which, despite the name, pushes attention towards *uniform* (convex on
[0, 1]: `sparse_then_prune_algo`; docs/compress.md). The reference's pruning set (patch embedding, every
block's Linears, both LayerNorm weights, classifier) is `targets=("patch_embed", "attn", "mlp", "head")` here
without the LayerNorms (zeroing norm gains silences channels; `prune` only prunes Linear / Conv weights); the
default is B1's set. Its SGD recipe (lr 1e-3, momentum 0.9, one-cycle) is replaced by `vk.fit`'s AdamW.

Hand-written here, and why: the penalty (`sparse_then_prune_algo.py`, two lines of torch): no library has it.
Pruning is `prune`'s (torch's L1 ranking). Refused: token-reduction methods applied before (their attention
biases would be missing from `A`; apply them after). Docs: docs/compress.md. Spec: compress.md B2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn

from vitkit.registry import Applied, applied, get, register
from vitkit.train.fit import add_loss

from . import _common
from . import sparse_then_prune_algo as algo

NAME = "sparse-then-prune"


@dataclass(frozen=True)
class Config:
    weight: float = field(default=0.01, metadata={
        "help": "λ of the attention penalty added to the loss (paper: 0.01)"})
    blocks: Literal["all", "last"] = field(default="all", metadata={
        "help": "blocks regularised: all (mean over blocks, the paper's statement) or last (the reference code)"})
    sparsity: float = field(default=0.1, metadata={
        "help": "fraction of target weights that finish(model) prunes by global magnitude (paper: 0.1)"})
    targets: tuple[str, ...] = field(default=_common.DEFAULT_TARGETS, metadata={
        "help": "layers finish(model) prunes (prune's names); the reference's set without LayerNorms: "
                "patch_embed, attn, mlp, head"})
    finished: bool = field(default=False, metadata={
        "help": "pruned and regulariser removed (set by finish(model) and recorded, so vk.load rebuilds that)"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"{NAME}: `weight` must be >= 0, got {self.weight}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"{NAME}: `sparsity` must be in [0, 1), got {self.sparsity}")


class _Capture:
    """Forward hook keeping the output of `attn.q_norm` / `attn.k_norm` (B, h, N, d) of the last forward."""

    def __init__(self, store: dict, key: tuple[int, str]):
        self.store, self.key = store, key

    def __call__(self, module, args, output):
        if torch.is_grad_enabled():  # training forwards only: inference keeps nothing
            self.store[self.key] = output


class _Penalty:
    """The loss term `weight · mean over regularised blocks of attention_log_penalty(q, k)`."""

    def __init__(self, store: dict, blocks: list[int], scales: list[float], weight: float):
        self.store, self.blocks, self.scales, self.weight = store, blocks, scales, weight

    def __call__(self, model, images, logits, targets) -> torch.Tensor:
        terms = [algo.attention_log_penalty(self.store[(i, "q")], self.store[(i, "k")], s)
                 for i, s in zip(self.blocks, self.scales)]
        self.store.clear()  # the next forward fills it again; nothing of this step is kept alive
        return self.weight * torch.stack(terms).mean()


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"{NAME}: needs a timm VisionTransformer, got {type(model).__name__}")
    if cfg.finished:  # vk.load of a finished run: the pruning is replayed by the recorded `prune`
        return model
    tokens = [a.name for a in applied(model) if get(a.name).kind == "accelerate"]
    if tokens:
        raise ValueError(f"{NAME}: {', '.join(tokens)} changes attention (biases, merged tokens) that the penalty "
                         "would not see; apply token reduction after sparse-then-prune")
    if any(isinstance(p, _Penalty) for p in model.__dict__.get("_vitkit_losses", [])):
        raise ValueError(f"{NAME}: already applied to this model; finish(model) first")
    blocks = list(range(len(model.blocks))) if cfg.blocks == "all" else [len(model.blocks) - 1]
    store: dict = {}
    for i in blocks:
        attn = model.blocks[i].attn
        attn.q_norm.register_forward_hook(_Capture(store, (i, "q")))
        attn.k_norm.register_forward_hook(_Capture(store, (i, "k")))
    add_loss(model, _Penalty(store, blocks, [model.blocks[i].attn.scale for i in blocks], cfg.weight))
    return model


def finish(model: nn.Module, sparsity: Optional[float] = None) -> nn.Module:
    """After fine-tuning: remove the regulariser, prune `sparsity` (default: the config's) of the targets by
    global magnitude (`prune`), and record both (so `vk.save` / `vk.load` rebuild the pruned model)."""
    import vitkit as vk

    entries = applied(model)
    index = next((i for i, a in enumerate(entries) if a.name == NAME and not a.config.finished), None)
    if index is None:
        raise ValueError(f"{NAME}: finish(model) needs a model with sparse-then-prune applied (and not finished)")
    cfg = entries[index].config
    cfg = cfg if sparsity is None else dataclasses.replace(cfg, sparsity=sparsity)  # checks the value first
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, _Capture)]:
            del module._forward_hooks[key]
    losses = model.__dict__.get("_vitkit_losses", [])
    losses[:] = [fn for fn in losses if not isinstance(fn, _Penalty)]
    entries[index] = Applied(NAME, dataclasses.replace(cfg, finished=True))
    return vk.compress(model, "prune", sparsity=cfg.sparsity, scope="global", targets=cfg.targets)


register(NAME, kind="compress", config=Config, apply=apply, identity={"weight": 0.0})
