"""Semantic proxies from visual prompts: parameter-efficient deep metric learning with the Proxy-Anchor loss.

Paper: *Learning Semantic Proxies from Visual Prompts for Parameter-Efficient Fine-Tuning in Deep Metric
Learning*, Ren et al., ICLR 2024, arXiv:2402.02340.

Claim: a frozen ViT with VPT-deep prompts, BitFit and an embedding head, trained with Proxy-Anchor against class
proxies that the ViT itself computes from class-specific prompts, matches or beats full-fine-tuning DML
(CUB-200, Cars-196, SOP, In-Shop, iNaturalist Recall@1) with a small fraction of the parameters. Measured here
(embedded ViT, digits 0–4 train, 5–9 retrieved, 3 seeds, benchmarks/RESULTS.md): Recall@1 0.819 ± 0.024 vs the
frozen embedding's 0.870 (a linear embedding with the same loss: 0.892): not reached at that scale.

Plugs in at: pattern 3 twice + BitFit. Image branch: VPT-deep prompts (`vitkit.adapt.vpt`, inserted after the
prefix at every block), every bias trainable, the pooled feature (class token, or the average for no-class-token
models) → `LayerNorm → Linear(D, embed_dim)` → L2-normalised embedding (`model.head.embed`). Proxy branch (training
only): each image is run again with the `proxy_prompts` prompts of its own class inserted after the image prompts
at block 0 (travelling through the blocks, the code's `proxy_prompt_layers = 1`), its pooled feature → a separate
`LayerNorm → Linear` → normalised; per class in the batch a `GRUCell` updates that class's memory vector from the
mean of these features (re-normalised; stored detached, so no gradient crosses steps). Proxies
`p_c = normalize(r·b_c + (1 − r)·memory_c)` with learned bias proxies `b` (Xavier / 8) and `r =
proxy_bias_ratio` (`r = 1`: plain Proxy-Anchor, no proxy branch). Loss: Proxy-Anchor (α, δ), means over all
classes (`mean_over`). The head becomes `ProxyHead`: `model(x)` returns `α · cos(embedding, p_c)` (B, C) for the
training classes; `vk.evaluate(model, data, protocol="retrieval")` ranks by the embedding (Recall@K, MAP@R on
held-out classes). Training: plain `vk.fit(model, train)`: the method sets `model.computes_loss`, so `fit` calls
`model(images, labels) -> (logits, loss, labels)` and the proxy branch and Proxy-Anchor loss run there
(`label_smoothing` and `add_loss` terms do not apply). The proxy pass runs without gradient checkpointing (its
class prompts are chosen per call). Batches should hold >= 2 images per class (the paper's sampler); `vk.fit`
samples uniformly.

Hand-written here, and why: pytorch-metric-learning has a ProxyAnchorLoss, but not proxies computed by the
network from prompts, nor the GRU memory; the loss is 10 lines (`dml_proxies_algo.py`) and vitkit adds no
dependency for it. Differs from the reference: AdamW at `lr` (the paper: SGD lr 1e-3, the bias proxies at lr
0.01); no AMP on CPU; any pooling / registers / no class token / LayerScale / qk-norm / input size.
Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P15.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.runner import BlockContext, _Bound, forward as runner_forward, get_runner, no_checkpointing
from vitkit.registry import register

from . import dml_proxies_algo as algo
from . import vpt
from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode
from .bitfit import bias_names

# The class prompts (B, m, D) of the proxy pass running now in this context; None: a plain forward.
_CLASS_PROMPTS: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("dml_proxies", default=None)


@dataclass(frozen=True)
class Config:
    num_prompts: int = field(default=20, metadata={"help": "image prompts per layer (VPT-deep, the paper's 20)"})
    proxy_prompts: int = field(default=5, metadata={"help": "class-specific prompts per class for the proxy branch"})
    embed_dim: int = field(default=512, metadata={"help": "width of the L2-normalised embedding and proxies"})
    alpha: float = field(default=32.0, metadata={"help": "Proxy-Anchor scale α"})
    delta: float = field(default=0.1, metadata={"help": "Proxy-Anchor margin δ"})
    proxy_bias_ratio: float = field(default=0.4, metadata={
        "help": "r in p_c = normalize(r·b_c + (1-r)·memory_c); 1: plain Proxy-Anchor (no proxy branch)"})
    mean_over: Literal["all", "present"] = field(default="all", metadata={
        "help": "Proxy-Anchor's positive term averaged over all classes (the code) or those in the batch (paper)"})
    bitfit: bool = field(default=True, metadata={"help": "train every bias of the backbone too (the paper's)"})
    lr: float = field(default=1e-3, metadata={"help": "vk.fit's learning rate unless one is given; from the paper's "
                                                      "config (SGD lr 1e-3; here AdamW)"})
    weight_decay: float = field(default=1e-6, metadata={"help": "vk.fit's weight decay unless one is given; from "
                                                                "the paper's config"})

    def __post_init__(self):
        for name in ("num_prompts", "proxy_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"dml-proxies: `{name}` must be >= 0, got {getattr(self, name)}")
        if self.embed_dim < 1:
            raise ValueError(f"dml-proxies: `embed_dim` must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.proxy_bias_ratio <= 1.0:
            raise ValueError(f"dml-proxies: `proxy_bias_ratio` must be in [0, 1], got {self.proxy_bias_ratio}")
        if self.proxy_bias_ratio < 1.0 and self.proxy_prompts == 0:
            raise ValueError("dml-proxies: `proxy_prompts` is 0 but the proxies use the proxy branch "
                             f"(`proxy_bias_ratio`={self.proxy_bias_ratio}); set proxy_prompts >= 1 or ratio 1")


class ProxyHead(nn.Module):
    """Embedding head, class prompts, proxy head, GRU memory and bias proxies; `forward` gives α·cos to proxies."""

    def __init__(self, dim: int, cfg: Config, num_classes: int, patch_size: tuple[int, int]):
        super().__init__()
        e = cfg.embed_dim
        self.cfg = cfg
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, e))
        self.proxy_embed = self.gru = self.class_prompts = None  # proxy_bias_ratio = 1: no proxy branch
        if cfg.proxy_bias_ratio < 1.0:
            self.proxy_embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, e))
            self.gru = nn.GRUCell(e, e)
            v = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))  # VPT's prompt init
            self.class_prompts = nn.Parameter(torch.empty(num_classes, cfg.proxy_prompts, dim).uniform_(-v, v))
        self.bias_proxies = nn.Parameter(nn.init.xavier_normal_(torch.empty(num_classes, e)) / 8)
        self.register_buffer("memory", torch.zeros(num_classes, e))

    def embedding(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, E), unit norm
        return F.normalize(self.embed(pooled), dim=-1)

    def proxies(self, memory: Optional[torch.Tensor] = None) -> torch.Tensor:  # (C, E), unit norm
        memory = self.memory if memory is None else memory
        return algo.combine_proxies(self.bias_proxies, memory.to(self.bias_proxies.dtype), self.cfg.proxy_bias_ratio)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        return self.cfg.alpha * self.embedding(pooled) @ self.proxies().T


def _before_block(x: torch.Tensor, ctx: BlockContext) -> Optional[torch.Tensor]:
    prompts = _CLASS_PROMPTS.get()
    if prompts is None:
        return None
    image_prompts_at = ctx.state.extra["vpt"]  # VPT-deep replaces its prompts there in the later blocks
    x = vpt._insert(x, prompts, ctx.state)  # after the prefix and the image prompts; counted as prompts
    ctx.state.extra["vpt"] = image_prompts_at
    return x


def _pooled(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _semantic_proxies(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Proxy branch: rerun with each image's class prompts, GRU-update the memory of the batch's classes."""
    head: ProxyHead = model.head
    if head.cfg.proxy_bias_ratio == 1.0:
        return head.proxies()
    token = _CLASS_PROMPTS.set(head.class_prompts[labels])  # (B, m, D): absent classes get no gradient
    try:
        with no_checkpointing():
            features = F.normalize(head.proxy_embed(_pooled(model, images)), dim=-1)
    finally:
        _CLASS_PROMPTS.reset(token)
    classes, means = algo.class_means(features, labels)
    memory = head.memory.detach().to(features.dtype)
    updated = F.normalize(head.gru(means, memory[classes]), dim=-1)  # (K, E)
    with torch.no_grad():
        head.memory[classes] = updated.detach().to(head.memory.dtype)  # detached across steps
    return head.proxies(memory.index_copy(0, classes, updated))


def _forward(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
    """`model(x)`: α·cos to the proxies; `model(x, labels)` (what `vk.fit` calls): (logits, loss, labels)."""
    if labels is None:
        return runner_forward(model, images, **kwargs)
    head: ProxyHead = model.head
    embedding = head.embedding(_pooled(model, images))
    sim = embedding @ _semantic_proxies(model, images, labels).T  # (B, C)
    loss = algo.proxy_anchor_loss(sim.float(), labels, head.cfg.alpha, head.cfg.delta, head.cfg.mean_over)
    return head.cfg.alpha * sim, loss, labels


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if hasattr(model, "vpt") or "dml-proxies" in runner.owners():
        raise ValueError("dml-proxies: the model already has VPT prompts (vpt or dml-proxies applied); apply "
                         "dml-proxies to a model without them")
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError("dml-proxies: the model has no classifier (num_classes=0); load it with num_classes=<the "
                         "number of training classes>: one proxy per class")
    keep = earlier_trainable(model)
    model = vpt.apply(model, vpt.Config(num_prompts=cfg.num_prompts, deep=True))
    with new_modules_follow_mode(model):
        model.head = like(ProxyHead(model.embed_dim, cfg, num_classes, tuple(model.patch_embed.patch_size)),
                          first_weight(model.patch_embed))
    runner.add("before_block", _before_block, owner="dml-proxies", blocks=[0])
    model.forward = _Bound(_forward, model)
    model.computes_loss = True  # vk.fit: model(images, labels) -> (logits, loss, labels)
    freeze_except(model, keep | {"vpt.prompts"} | (bias_names(model) if cfg.bitfit else set()), train_head=True)
    model.head.memory.requires_grad_(False)
    return model


register("dml-proxies", kind="adapt", config=Config, apply=apply)
