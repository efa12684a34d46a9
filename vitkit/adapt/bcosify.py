"""B-cosification: convert a pretrained timm ViT into a B-cos network, then fine-tune it whole.

Paper: *B-cosification: Transforming Deep Neural Networks to be Inherently Interpretable*, Arya et al., NeurIPS
2024, arXiv:2411.00715.

Claim: a pretrained model converted to B-cos layers (dynamic-linear, `y = W(x)·x`) and fine-tuned briefly
gives explanations that are exact contribution maps, at a fraction of the cost of training a B-cos network from
scratch. `vk.explain(model, image, method="bcos")` (vitkit/explain/bcos.py) reads those maps.

Plugs in at: pattern 1 (module swaps, weights copied; fused SDPA untouched). Every Linear but `attn.qkv` becomes
a B-cos linear (`attn.proj`, `mlp.fc1`, `mlp.fc2`, `head`); `attn.qkv` stays linear (its q, k only feed the
attention, which explanation mode detaches); the patch conv becomes a B-cos conv on the 6-channel encoding
`[x, 1 − x]` (normalised: `[z, −z]` for the usual normalised image z, weight `[W/2, −W/2]`, exactly the original
conv); every LayerNorm (`norm1/2`, qk-norm, `norm`, `fc_norm`, `norm_pre`) becomes a detachable LayerNorm, the
MLP's GELU a detachable GELU; LayerScale is kept (a diagonal linear map). All biases go (`bias=True` keeps them);
the head adds the constant `log(1/(C − 1))`; with `gap_reorder` an average-pooled model applies the head to every
token and then averages (`forward_head(pre_logits=True)` still returns the pooled features). Then every
parameter trains (`vk.fit`, Adam at the paper's lr 1e-3). Explanation mode (`explanation_mode()`) detaches the
B-cos scales, LayerNorm stds, GELU gates and q, k (through the `q_norm`/`k_norm` sites, so SDPA stays): the
network is then linear in its input and in its input-independent tokens (class, registers, position embeddings).

Hand-written here, and why: no maintained library converts timm models to B-cos (the authors' code targets their
own SimpleViT / ViT-C). Differs from the reference: b = 2 on the *unnormalised* copied weights (spec decision),
the encoding computed inside the model from the normalised input (so data pipelines stay as they are), and the
LayerNorm mean kept live in explanation mode (centring is linear). Applied first, to a model no other method has
changed. Docs: docs/explain.md. Spec: ../shared/methods/explain.md E4.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.layers.activations import GELU, GELUTanh
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from vitkit.models.runner import _Bound
from vitkit.registry import applied, register

from . import bcosify_algo as algo
from ._common import new_modules_follow_mode

_EXPLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("vitkit_bcos_explain", default=False)
POOLS = ("token", "avg")
NORMS = (nn.LayerNorm, LayerNorm)  # over the last dim (not timm's channels-first LayerNorm2d, a subclass)


@dataclass(frozen=True)
class Config:
    b: float = field(default=2.0, metadata={
        "help": "B-cos exponent: outputs scaled by (|w·x|/|x|)^(b-1); 1 gives plain linear layers"})
    bias: bool = field(default=False, metadata={
        "help": "keep the biases (the paper removes them; kept, they join the additive constants of an explanation)"})
    gap_reorder: bool = field(default=True, metadata={
        "help": "average-pooled models: apply the head to every token, then average (no effect with a class token)"})
    logit_bias: bool = field(default=True, metadata={"help": "add the constant log(1/(C-1)) to every logit"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given; from the paper: its Adam lr (cosine with warmup; explain.md E4)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "vk.fit's weight decay unless one is given; 0 from the paper, which trains with Adam"})

    def __post_init__(self):
        if not self.b >= 1:
            raise ValueError(f"bcosify: `b` must be >= 1 (1: plain linear layers), got {self.b}")


@contextmanager
def explanation_mode() -> Iterator[None]:
    """Inside (this thread / task), B-cos modules detach their input-dependent factors: `y = W(x)·x` with W(x)
    a constant for autograd, so `x ⊙ ∂y/∂x` sums to y minus the additive constants."""
    token = _EXPLAIN.set(True)
    try:
        yield
    finally:
        _EXPLAIN.reset(token)


class BcosLinear(nn.Module):
    """`bcosify_algo.bcos_linear` with the weight (and, if kept, the bias) of the Linear it replaces; the head
    also adds `logit_bias`."""

    def __init__(self, linear: nn.Linear, b: float, bias: bool, logit_bias: float = 0.0):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias if bias else None
        self.b, self.logit_bias = b, logit_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = algo.bcos_linear(x, self.weight, self.bias, self.b, _EXPLAIN.get())
        return y + self.logit_bias if self.logit_bias else y

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features={out}, b={self.b:g}, bias={self.bias is not None}" + (
            f", logit_bias={self.logit_bias:.4f}" if self.logit_bias else "")


class BcosPatchConv(nn.Module):
    """The patch conv on the 6-channel encoding: takes the usual normalised image z, computes `[z, −z]` and
    a B-cos conv with weight `[W/2, −W/2]` (exactly W ⊛ z at b = 1)."""

    def __init__(self, conv: nn.Conv2d, b: float, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(algo.encode_weight(conv.weight.detach()), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias if bias else None
        self.stride, self.padding, self.b = conv.stride, conv.padding, b
        self.in_channels = conv.in_channels  # the image channels it takes (read by token_layout, MAE, ...)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return algo.bcos_conv2d(algo.encode(z), self.weight, self.bias, self.stride, self.padding, self.b,
                                _EXPLAIN.get())

    def extra_repr(self) -> str:
        return f"encoding=[z, -z], weight={tuple(self.weight.shape)}, b={self.b:g}, bias={self.bias is not None}"


class BcosLayerNorm(nn.Module):
    """LayerNorm whose std is detached in explanation mode; `detach_output` (qk-norm) detaches its output there."""

    def __init__(self, norm: nn.LayerNorm, bias: bool, detach_output: bool = False):
        super().__init__()
        self.eps, self.detach_output = norm.eps, detach_output
        self.weight = norm.weight
        self.bias = norm.bias if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        explain = _EXPLAIN.get()
        y = algo.layer_norm(x, self.weight, self.bias, self.eps, explain)
        return y.detach() if explain and self.detach_output else y


class DetachInExplanation(nn.Module):
    """Replaces `attn.q_norm` / `attn.k_norm` when they are `nn.Identity`: q and k detached in explanation mode,
    so the attention matrix is a constant while v stays live (fused SDPA kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if _EXPLAIN.get() else x


class BcosGELU(nn.Module):
    """GELU whose gate Φ(x) is detached in explanation mode."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return algo.gelu(x, self.approximate, _EXPLAIN.get())


def is_bcosified(model: nn.Module) -> bool:
    return any(a.name == "bcosify" for a in applied(model))


def _gelu_mode(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    return {GELU: "none", GELUTanh: "tanh"}.get(type(act))


# containers, parts without weights, and LayerScale (a diagonal linear map): kept as they are
KEPT = (PatchEmbed, Block, Attention, Mlp, LayerScale, DropPath, PatchDropout, nn.Identity, nn.Dropout,
        nn.Sequential)


def _plan(model: nn.Module, cfg: Config) -> list[tuple[str, nn.Module | None]]:
    """(name, replacement) for every module to swap (None: `attn.qkv`, which only loses its bias); refuses,
    naming it, anything the conversion cannot handle."""
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"bcosify: needs a timm VisionTransformer, got {type(model).__name__}")
    if applied(model):
        raise ValueError(f"bcosify: apply it first, to the pretrained model; this one already has "
                         f"{', '.join(a.name for a in applied(model))} applied")
    if model.attn_pool is not None or model.global_pool not in POOLS:
        raise NotImplementedError(f"bcosify: global_pool {model.global_pool!r} is not supported (only "
                                  f"{' and '.join(POOLS)}: attention and max pooling have no B-cos conversion here)")
    num_classes = getattr(model, "num_classes", 0)
    if cfg.logit_bias and num_classes == 1:
        raise ValueError("bcosify: `logit_bias` log(1/(C-1)) needs at least 2 classes; pass logit_bias=False")
    logit_bias = math.log(1 / (num_classes - 1)) if cfg.logit_bias and num_classes >= 2 else 0.0
    plan = []
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if name == "patch_embed.proj" and isinstance(m, nn.Conv2d) and m.groups == 1 and m.dilation == (1, 1) \
                and m.padding_mode == "zeros":
            plan.append((name, BcosPatchConv(m, cfg.b, cfg.bias)))
        elif leaf == "qkv" and isinstance(m, nn.Linear):
            plan.append((name, None))  # stays linear
        elif leaf in ("q_norm", "k_norm") and (isinstance(m, nn.Identity) or type(m) in NORMS):
            plan.append((name, DetachInExplanation() if isinstance(m, nn.Identity)
                         else BcosLayerNorm(m, cfg.bias, detach_output=True)))
        elif isinstance(m, nn.Linear):
            plan.append((name, BcosLinear(m, cfg.b, cfg.bias, logit_bias if leaf.startswith("head") else 0.0)))
        elif type(m) in NORMS:
            plan.append((name, BcosLayerNorm(m, cfg.bias)))
        elif leaf == "act" and _gelu_mode(m) is not None:
            plan.append((name, BcosGELU(_gelu_mode(m))))
        elif isinstance(m, Attention) and getattr(m, "gate", None) is not None:
            raise NotImplementedError(f"bcosify: {name} has a gated attention output, which has no B-cos "
                                      "conversion here")
        elif name == "" or isinstance(m, KEPT):
            continue
        else:
            raise NotImplementedError(f"bcosify: no B-cos conversion for {name} ({type(m).__name__}); supported: "
                                      "timm ViTs with a conv patch embedding, LayerNorm, GELU MLPs, LayerScale")
    return plan


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    plan = _plan(model, cfg)  # all checks before the first change
    with new_modules_follow_mode(model):
        for name, new in plan:
            if new is None:  # attn.qkv
                if not cfg.bias:
                    model.get_submodule(name).register_parameter("bias", None)
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    if cfg.gap_reorder and model.global_pool == "avg":
        model.forward_head = _Bound(forward_head_reordered, model)
    model.requires_grad_(True)  # B-cosification fine-tunes every weight
    return model


def forward_head_reordered(model: VisionTransformer, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """`forward_head` with the head applied to every token before the model's pooling (size-weighted when
    tokens were merged); `pre_logits=True` returns timm's pooled features."""
    if pre_logits:
        return VisionTransformer.forward_head(model, x, pre_logits=True)
    return model.pool(model.head(model.head_drop(model.fc_norm(x))))


register("bcosify", kind="adapt", config=Config, apply=apply,
         identity={"b": 1.0, "bias": True, "gap_reorder": False, "logit_bias": False})
