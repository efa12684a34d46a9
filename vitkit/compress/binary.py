"""BiViT: binary weights (per-row scale) and softmax-aware binary attention, trained with straight-through estimators.

Paper: *BiViT: Extremely Compressed Binary Vision Transformers*, He et al., ICCV 2023, arXiv:2211.07091.

Claim: with 1-bit weights and activations and softmax-aware binarisation (SAB) a ViT keeps much of its accuracy
after training (+19.8 % over the previous best on TinyImageNet; Swin-T 70.8 % ImageNet top-1). Benchmarked:
the embedded model adapted to digits, binarised and fitted briefly with plain CE (`benchmarks/
compress_structured.py`): 89.9 % of full-precision top-1 (mean of 3 seeds, 87.9-91.4 %) after a 10-epoch fit
on 1,000 digits, above the 80 % target (benchmarks/RESULTS.md).

Plugs in at: pattern 1, module swaps. Every targeted Linear (`attn.qkv`, `attn.proj` for part `attn`;
`mlp.fc1`, `mlp.fc2` for part `mlp`) becomes a `BinaryLinear` that keeps the Linear's own `weight` (the latent
full-precision weight) and `bias` and adds `alpha (out, 1)`, set to `mean_row |W|` from the loaded weights at
apply time: `y = sign(x) @ (α ⊙ sign(W − mean_row W))ᵀ + b`. For part `attn`, `block.attn` becomes a
`BinaryAttention` holding timm's own sub-modules (same state-dict keys) whose attention is eager SAB:
`q, k, v` binarised after `q_norm` / `k_norm`, `b = 1[p >= τ·max_row p]` of `p = softmax(q kᵀ/√d)` in the
forward, `p`'s gradient in the backward. `patch_embed`, `head`, norms, `attn.norm`, `attn.gate`, LayerScale
stay full precision. Training: `vk.fit` (plain cross-entropy); distilling from the full-precision model is the
paper's recipe and the recommended one once vitkit's KD lands (`vk.distill`). Cross-layer binarisation (the
paper binarises attention and MLP in separate stages, whose order and lengths are not released): apply
`binary` with `parts=("mlp",)`, fit, then `parts=("attn",)`, fit. `packed_state` exports the signs 8 per byte
plus `α` (about 1/32 of fp32).

Hand-written here, and why: no maintained library binarises timm ViTs (torchao and torch.ao stop at 2-4 bits,
Torch-Pruning does not quantise); the estimators are in `binary_algo.py` (torch only). Differs from the
reference: `α` is set from the loaded weights at apply time (the reference sets it lazily at the first forward
and re-initialises `W`); `τ` (`sab_ratio`) is configurable; `sign(0) = +1`. Docs: docs/compress.md.
Spec: ../shared/methods/compress.md B3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention, resolve_self_attn_mask

from vitkit.registry import register

from . import binary_algo as algo

PARTS = ("attn", "mlp")


@dataclass(frozen=True)
class Config:
    parts: tuple[str, ...] = field(default=PARTS, metadata={
        "help": "what is binarised: 'attn' (qkv, proj and SAB attention) and/or 'mlp' (fc1, fc2); apply once per "
                "part and fit in between for the paper's cross-layer stages"})
    activations: bool = field(default=True, metadata={
        "help": "binarise the Linear inputs and q, k, v too (W1A1, the paper); False: binary weights only"})
    sab_ratio: float = field(default=0.25, metadata={
        "help": "SAB threshold τ: attention 1 where p >= τ · max of its row (the reference's 0.25)"})
    train_all: bool = field(default=True, metadata={
        "help": "every parameter trains (binarisation-aware training of the whole model, the paper's); False: only "
                "the binary layers (latent weights, biases, α) and what trained before"})
    lr: float = field(default=1e-3, metadata={
        "help": "vk.fit's learning rate unless one is given (AdamW; the paper's recipe is not released; the rate of "
                "the digits recovery run in benchmarks/compress_structured.py, not tuned)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "vk.fit's AdamW weight decay unless one is given (0: decay would pull latent weights to the sign "
                "boundary)"})

    def __post_init__(self):
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ValueError(f"binary: `parts` must be a non-empty subset of {PARTS}, got {self.parts}")
        if not 0.0 < self.sab_ratio <= 1.0:
            raise ValueError(f"binary: `sab_ratio` must be in (0, 1], got {self.sab_ratio}")


class BinaryLinear(nn.Module):
    """`y = act(x) @ (α ⊙ sign(W − mean_row W))ᵀ + b`, with the wrapped Linear's own `weight` and `bias`."""

    def __init__(self, linear: nn.Linear, activations: bool):
        super().__init__()
        self.in_features, self.out_features, self.activations = linear.in_features, linear.out_features, activations
        self.weight, self.bias = linear.weight, linear.bias
        self.alpha = nn.Parameter(linear.weight.detach().abs().mean(dim=1, keepdim=True).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = algo.binary_activation(x) if self.activations else x
        return F.linear(x, algo.binary_weight(self.weight, self.alpha).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}"


class BinaryAttention(nn.Module):
    """timm's `Attention` sub-modules (same names and keys) with softmax-aware binary attention (eager)."""

    def __init__(self, attn: Attention, activations: bool, sab_ratio: float):
        super().__init__()
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.activations, self.sab_ratio = activations, sab_ratio

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, h, N, d)
        if self.activations:
            q, k, v = algo.binary_activation(q), algo.binary_activation(k), algo.binary_activation(v)
        logits = q @ k.transpose(-2, -1) * self.scale  # (B, h, N, N)
        bias = resolve_self_attn_mask(N, logits, attn_mask, is_causal)
        if bias is not None:
            logits = logits + bias
        x = self.attn_drop(algo.softmax_binary(logits, self.sab_ratio)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _binary(linear: nn.Module, where: str, activations: bool) -> BinaryLinear:
    if type(linear) is not nn.Linear:
        raise ValueError(f"binary: {where} is a {type(linear).__name__}, not a Linear; merge adapters first (e.g. "
                         "vitkit.adapt.lora.merge(model)) or apply binary before adapting")
    return BinaryLinear(linear, activations)


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"binary: needs a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):  # check every block before changing any
        if "attn" in cfg.parts and type(block.attn) is not Attention:
            raise ValueError(f"binary: block {i}'s attention is a {type(block.attn).__name__}, not timm's Attention"
                             f"{' (attn is binarised already)' if isinstance(block.attn, BinaryAttention) else ''}")
        if "mlp" in cfg.parts and (type(block.mlp) is not Mlp or isinstance(block.mlp.fc1, BinaryLinear)):
            raise ValueError(f"binary: block {i}'s MLP is not a plain timm Mlp (or is binarised already)")
    before = {id(p) for p in model.parameters() if p.requires_grad}
    for i, block in enumerate(model.blocks):
        if "attn" in cfg.parts:
            attn = block.attn
            attn.qkv = _binary(attn.qkv, f"block {i} attn.qkv", cfg.activations)
            attn.proj = _binary(attn.proj, f"block {i} attn.proj", cfg.activations)
            block.attn = BinaryAttention(attn, cfg.activations, cfg.sab_ratio).train(attn.training)
        if "mlp" in cfg.parts:
            block.mlp.fc1 = _binary(block.mlp.fc1, f"block {i} mlp.fc1", cfg.activations)
            block.mlp.fc2 = _binary(block.mlp.fc2, f"block {i} mlp.fc2", cfg.activations)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(cfg.train_all or id(p) in before or isinstance(module, BinaryLinear))
    return model


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The export form: every `BinaryLinear` as `<name>.signs` (uint8, 8 signs per byte), `<name>.alpha` and
    `<name>.bias` (fp32); every other tensor as is. `binary_algo.unpack_signs` reverses the packing."""
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    out = {k: v.detach() for k, v in model.state_dict().items()
           if not (k.rsplit(".", 1)[0] in binary and k.endswith(".weight"))}
    for name, m in binary.items():
        out[f"{name}.signs"] = algo.pack_signs(m.weight.detach())
    return out


register("binary", kind="compress", config=Config, apply=apply)
