"""TCPA, Token-Coordinated Prompt Attention: per-layer prompt pools; each token attends to its own top-k prompts.

Paper: *Token Coordinated Prompt Attention is Needed for Visual Prompting*, Liu et al., ICML 2025,
arXiv:2505.02406.

Claim: the class token seeing only *CLS prompts* and each patch only its top-k *image prompts* (chosen by cosine
between the token and the pool keys) gives more diverse and discriminative features than VPT's prompts shared by
every token; a plug-in for VPT-style prompting.

Plugs in at: pattern 3 with **eager attention in the blocks it changes** (`layers`; every block by default) and
fused SDPA everywhere else; `vk.info` lists those blocks. Per changed block: a `before_block` function matches
the block input (before `norm1`, detached) against the CLS keys (class-token row) and the image keys (patch rows)
and keeps the top-k slots in the call's token state, with the layer's pool loss; the block's attention (its
`forward` replaced on the instance, timm's `Attention` class untouched) runs the block's own `qkv`, `q_norm`,
`k_norm`, `attn_drop`, `norm`, `gate`, `proj` on `[norm1(x) | norm1(prompts)]`, keeps the original query rows,
takes the softmax over every key (all 2Mℓ pool prompts in the denominator), multiplies it by the 0/1 mask (all
original tokens; the class row its chosen CLS slots; patch rows their chosen image slots; registers and other
methods' prompts no prompt) **without renormalising**, and returns `proj(A v)`. Residuals and the MLP stay
prompt-free. The pool loss `w·Σ_l [mean(1 - cos(cls, chosen CLS keys)) + mean(1 - cos(patch, chosen image
keys))]` is added to the task loss through `vk.fit`'s `add_loss` hook; it is the only term that moves the keys
(top-k is not differentiable). Trainable: head + keys and prompts, `L_t·(M·D + M·ℓ·D)` per pool (`L_t` changed
blocks; models without a class token have no CLS pool, the spec's decision). `pool_size = 0` runs the same eager
path with no prompt: exactly timm's attention (the registered identity). Works on registers, no class token,
LayerScale, qk-norm, any input size, gradient checkpointing, and after token merging (merged tokens count as
patch rows; an additive mask from another method is kept).

Hand-written here, and why: no library has prompt pools or a post-softmax attention mask; SDPA cannot express a
mask applied after the softmax without renormalisation, so these blocks run eager attention (memory
`O(B·h·N·(N + 2Mℓ))`). The algorithm is in `tcpa_algo.py`. Differs from the reference: the random slot choice of
the first epochs (`random_epochs`) and the optional input prompter (conv) are not offered (vk.fit has no epoch
hook for models; top-k from step 0); the Fourier prompt transform of the released VFPT variant is `fourier=True`
(off by default: the paper's tables are plain VPT + TCPA); prompts pass through the block's `norm1` like tokens.
Docs: docs/adapt.md. Spec: ../shared/methods/adapt.md P7.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models.runner import BlockContext, get_runner
from vitkit.registry import register
from vitkit.train.fit import add_loss

from . import tcpa_algo as algo
from ._common import earlier_trainable, first_weight, freeze_except, like, new_modules_follow_mode

NAME = "tcpa"


@dataclass(frozen=True)
class Config:
    pool_size: int = field(default=20, metadata={"help": "slots M per pool and layer (0: no prompt, the identity)"})
    prompt_length: int = field(default=4, metadata={"help": "prompt tokens ℓ per slot"})
    top_k: int = field(default=3, metadata={"help": "slots k each token attends to (<= pool_size)"})
    loss_weight: float = field(default=0.1, metadata={"help": "weight w of the pool (key matching) loss"})
    layers: tuple[int, ...] = field(default=(), metadata={
        "help": "blocks that get pools and eager attention (negative counts from the end); empty: every block"})
    fourier: bool = field(default=False, metadata={"help": "VFPT's transform of the prompts, Re(FFT_seq(FFT_D(.)))"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt tokens"})
    train_head: bool = field(default=True, metadata={"help": "train the classification head too"})
    lr: float = field(default=3e-2, metadata={
        "help": "vk.fit's AdamW learning rate unless one is given; from the lr sweep of benchmarks/adapt_prompt.py "
                "(digits, 2 epochs: 1e-3 0.312, 4e-3 0.552, 1e-2 0.610, 3e-2 0.702; RESULTS.md); the paper's "
                "CIFAR-100 recipe (100 epochs) uses 4e-3"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "vk.fit's weight decay unless one is given; from the paper's CIFAR-100 recipe"})

    def __post_init__(self):
        for name in ("pool_size", "prompt_length", "top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"tcpa: `{name}` must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.pool_size or (self.pool_size and not self.top_k) or (
                self.pool_size and not self.prompt_length):
            raise ValueError(f"tcpa: `top_k` must be in 1..pool_size and `prompt_length` >= 1 (got top_k="
                             f"{self.top_k}, pool_size={self.pool_size}, prompt_length={self.prompt_length}); "
                             "pool_size=0 with top_k=0 is the identity")
        if self.loss_weight < 0:
            raise ValueError(f"tcpa: `loss_weight` must be >= 0, got {self.loss_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"tcpa: `dropout` must be in [0, 1), got {self.dropout}")


class Pools(nn.Module):
    """Keys (L_t, M, D) and prompts (L_t, M, ℓ, D) of the image pool and, with a class token, the CLS pool."""

    def __init__(self, layers: list[int], cfg: Config, dim: int, cls_pool: bool):
        super().__init__()
        L, M, n = len(layers), cfg.pool_size, cfg.prompt_length
        self.layers, self.top_k, self.fourier, self.dropout = layers, cfg.top_k, cfg.fourier, cfg.dropout
        self.loss_weight = cfg.loss_weight
        self.img_keys = nn.Parameter(torch.empty(L, M, dim).uniform_(-1, 1))
        self.img_prompts = nn.Parameter(torch.empty(L, M, n, dim).uniform_(-1, 1))
        self.cls_keys = nn.Parameter(torch.empty(L, M, dim).uniform_(-1, 1)) if cls_pool else None
        self.cls_prompts = nn.Parameter(torch.empty(L, M, n, dim).uniform_(-1, 1)) if cls_pool else None

    def tokens(self, j: int) -> torch.Tensor:
        """(p, D) prompt tokens of changed block j: CLS pool first, slot-major."""
        pools = [p[j].flatten(0, 1) for p in (self.cls_prompts, self.img_prompts) if p is not None]
        t = torch.cat(pools) if len(pools) > 1 else pools[0]
        t = algo.fourier(t) if self.fourier else t
        return F.dropout(t, self.dropout, self.training)


def _match(x: torch.Tensor, ctx: BlockContext) -> None:
    """Before a changed block: top-k slots per token from the block input; the layer's pool loss."""
    pools: Pools = ctx.model.tcpa
    j, state = pools.layers.index(ctx.index), ctx.state
    if pools.top_k == 0:
        return
    xd = x.detach()  # the keys move by the loss alone; the tokens are the frozen backbone's
    row = state.layout.cls_index
    cls_idx = cls_cos = None
    if pools.cls_keys is not None:
        cls_idx, cls_cos = algo.top_slots(xd[:, row:row + 1], pools.cls_keys[j], pools.top_k)
    patch_idx, patch_cos = algo.top_slots(xd[:, state.num_prefix_tokens:], pools.img_keys[j], pools.top_k)
    state.extra[NAME] = (cls_idx, patch_idx)
    state.extra[NAME + ":loss"] = state.extra.get(NAME + ":loss", ()) + (algo.pool_loss(cls_cos, patch_cos),)


class _Attention:
    """The eager TCPA attention of block `index` (set as that block's `attn.forward`)."""

    owner = NAME  # vk.info lists the blocks whose attention runs eagerly
    capture_refusal = ("attention: this block runs tcpa's masked eager attention (the prompt keys of each row differ "
                       "and its rows sum to < 1); attention maps and rollout of a tcpa model are not offered")

    def __init__(self, model: nn.Module, index: int):
        self.model, self.index = model, index

    def __call__(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        model, block = self.model, self.model.blocks[self.index]
        attn, pools, state = block.attn, model.tcpa, get_runner(model).state
        if is_causal:
            raise NotImplementedError("tcpa: causal attention is not supported")
        B, N, _ = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], 3, attn.num_heads, attn.head_dim).permute(  # noqa: E731
            2, 0, 3, 1, 4).unbind(0)  # (B, h, n, d) each
        q, k, v = split(attn.qkv(x))
        q, k = attn.q_norm(q), attn.k_norm(k)  # the tokens' q, k: what taps on q_norm / k_norm (tome) read
        allowed, p = None, 0
        if pools.top_k:
            j, M, n = pools.layers.index(self.index), pools.img_keys.shape[1], pools.img_prompts.shape[2]
            _, pk, pv = split(attn.qkv(block.norm1(pools.tokens(j).to(x.dtype)))[None])  # keys/values only
            pk = attn.k_norm.forward(pk)  # prompt keys pass k_norm too, without firing the token taps
            p = pk.shape[2]
            k, v = torch.cat([k, pk.expand(B, -1, -1, -1)], 2), torch.cat([v, pv.expand(B, -1, -1, -1)], 2)
            cls_idx, patch_idx = state.extra[NAME]
            cls_cols = None if cls_idx is None else algo.slot_columns(cls_idx, M, n)[:, 0]
            allowed = algo.allowed_keys(N, state.layout.cls_index, state.num_prefix_tokens, cls_cols,
                                        algo.slot_columns(patch_idx, M, n))
        a = algo.masked_attention(q, k, attn.scale, allowed, _pad_bias(attn_mask, p))
        o = attn.norm((attn.attn_drop(a) @ v).transpose(1, 2).reshape(B, N, attn.attn_dim))
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(o))


def _pad_bias(mask: Optional[torch.Tensor], p: int) -> Optional[torch.Tensor]:
    """Another method's SDPA mask over the original keys, extended by zeros over the prompt keys."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return F.pad(mask, (0, p))


def pool_loss(model: nn.Module, images=None, logits=None, targets=None) -> torch.Tensor:
    """`w·Σ_l` pool losses of the model's last forward (the `add_loss` term vk.fit adds to the task loss)."""
    state = get_runner(model).state
    terms = () if state is None else state.extra.get(NAME + ":loss", ())
    if not terms:
        return torch.zeros((), device=model.tcpa.img_keys.device)
    return model.tcpa.loss_weight * torch.stack(terms).sum()


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    runner = get_runner(model)  # NotImplementedError for non-timm ViTs
    if NAME in runner.owners() or hasattr(model, "tcpa"):
        raise ValueError("tcpa: already applied to this model")
    depth = len(model.blocks)
    bad = [i for i in cfg.layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"tcpa: `layers` {bad} out of range for a model with {depth} blocks")
    layers = sorted({i % depth for i in cfg.layers}) if cfg.layers else list(range(depth))
    missing = [a for a in ("qkv", "q_norm", "k_norm", "scale", "num_heads", "head_dim", "attn_dim", "norm",
                           "proj", "proj_drop", "attn_drop") if not hasattr(model.blocks[layers[0]].attn, a)]
    if missing:
        raise NotImplementedError(f"tcpa: the blocks' attention ({type(model.blocks[layers[0]].attn).__name__}) "
                                  f"lacks {missing}; tcpa runs timm's `Attention` parts eagerly")
    keep = earlier_trainable(model)
    with new_modules_follow_mode(model):
        model.tcpa = like(Pools(layers, cfg, model.embed_dim, cls_pool=getattr(model, "cls_token", None) is not None),
                          first_weight(model.patch_embed))
    runner.add("before_block", _match, owner=NAME, blocks=layers)
    for i in layers:
        model.blocks[i].attn.forward = _Attention(model, i)
    add_loss(model, pool_loss)
    freeze_except(model, keep | {n for n, _ in model.named_parameters() if n.startswith("tcpa.")}, cfg.train_head)
    return model


register(NAME, kind="adapt", config=Config, apply=apply, identity={"pool_size": 0, "top_k": 0})
