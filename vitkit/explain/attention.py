"""Attention maps of a timm ViT that keeps fused attention (spec: ../shared/methods/explain.md, E1).

*Claim.* Fused SDPA never materialises the softmax, so timm's `AttentionExtract`, vit-explain and friends read
nothing (or raise). The softmax can be recomputed exactly from what SDPA sees: every timm `Attention` calls
`q_norm` and `k_norm` (modules, `nn.Identity` when qk-norm is off) on the post-projection `q, k` of shape
(B, h, N, d). Read-only forward hooks on those two modules give `A = softmax(q kᵀ · scale + mask)` with the
model's forward untouched: no `fused_attn` flag is flipped, the logits are bit-identical.

*Plugs in at.* Forward hooks on `blocks[i].attn.q_norm` / `.k_norm`, and a forward pre-hook on `blocks[i].attn`
that reads the `attn_mask` the block runner hands to SDPA (ToMe's proportional attention, padding masks).
When the model has vitkit's block runner, its per-forward `TokenState` is read at that moment too: prompts
inserted by adapters (`num_prompts`) and the source map of merged tokens (`source`, `sizes`) are recorded per
layer, so every map can be put back on the patch grid.

*Hand-written here, and why.* timm offers `AttentionExtract`, which needs `fused_attn=False` (a global switch
that changes the forward numerics); the q/k hook is ~20 lines and keeps SDPA. Only requested layers are
computed (memory O(h·N²) per layer).

Docs: docs/explain.md.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn

from vitkit.models.layout import TokenLayout, token_layout

from .rollout_algo import fuse_heads

_log = logging.getLogger("vitkit")

HeadReduce = Union[str, int]
Query = Union[str, int, tuple]


@dataclass
class LayerAttention:
    """Softmax attention of one block for one forward, with the token layout it was computed on.

    Sequence order: `[prefix (cls, registers, dist) | prompts | tokens]`; the tokens are the patches, or after
    token reduction the surviving (possibly merged) tokens, which `source` maps back to the patch grid.

    Attributes:
        index: block index.
        attn: (B, h, N, N) softmax attention; rows sum to 1.
        layout: the model's static token layout (prefix tokens).
        grid: (gh, gw) patch grid of this input.
        num_prompts: prompt tokens right after the prefix at this block.
        source: (B, gh*gw) index into this block's sequence of the token each patch belongs to (-1: the
            patch's token was dropped), or None.
        sizes: (B, N, 1) patches per token, or None while all tokens are single patches.
    """

    index: int
    attn: Optional[torch.Tensor]  # None with `capture(..., softmax=False)`
    layout: TokenLayout
    grid: tuple[int, int]
    num_prompts: int = 0
    source: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None  # (B, h, N, d) values, kept with `capture(..., values=True)`
    out: Optional[torch.Tensor] = None  # (B, N, h*d) attention output A·V (SDPA's), with `values=True`
    q: Optional[torch.Tensor] = None  # (B, h, N, d) queries after `q_norm` (what SDPA sees), with `tokens=True`
    k: Optional[torch.Tensor] = None  # (B, h, N, d) keys after `k_norm`, with `tokens=True`

    def attn_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """∂y/∂A (B, h, N, N) from ∂y/∂(A·V) (B, N, h*d): since the SDPA output is O = A·V (eval mode),
        ∂y/∂A = ∂y/∂O · Vᵀ, so the gradient w.r.t. the attention needs no eager attention."""
        B, h, N, d = self.v.shape
        g = grad_out.reshape(B, N, h, d).transpose(1, 2)
        return g @ self.v.transpose(-2, -1)

    @property
    def num_prefix_tokens(self) -> int:
        """Class, register, distillation tokens and prompts: everything before the patch tokens."""
        return self.layout.num_prefix_tokens + self.num_prompts

    @property
    def prompt_indices(self) -> tuple[int, ...]:
        p = self.layout.num_prefix_tokens
        return tuple(range(p, p + self.num_prompts))

    def heads(self, head: HeadReduce = "mean") -> torch.Tensor:
        """(B, N, N) attention fused over heads: 'mean', 'max', 'min', or one head index; 'all' keeps them."""
        a = self.attn
        if head == "all":
            return a
        if isinstance(head, int):
            if not -a.shape[1] <= head < a.shape[1]:
                raise ValueError(f"attention: `head` {head} out of range for {a.shape[1]} heads")
            return a[:, head]
        if head in ("mean", "max", "min"):
            return fuse_heads(a, head)
        raise ValueError(f"attention: `head` must be 'mean', 'max', 'min', 'all' or an int, got {head!r}")

    def query_rows(self, a: torch.Tensor, query: Query = "cls") -> torch.Tensor:
        """Select query rows of `a` (..., N, N) -> (..., N).

        `query`: 'cls' (the class token; models without one fall back to 'mean'), 'mean' (mean over the
        patch-token queries), ('prefix', i), ('prompt', i), ('patch', r, c) or an int sequence index.
        """
        p = self.num_prefix_tokens
        if query == "cls":
            if self.layout.cls_index is None:
                return self.query_rows(a, "mean")
            return a[..., self.layout.cls_index, :]
        if query == "mean":
            return self._token_weighted_mean(a[..., p:, :])
        if isinstance(query, int):
            return a[..., query, :]
        if isinstance(query, tuple) and query and query[0] == "prefix":
            return a[..., query[1], :]
        if isinstance(query, tuple) and query and query[0] == "prompt":
            if not 0 <= query[1] < self.num_prompts:
                raise ValueError(f"attention: prompt {query[1]} requested, block {self.index} has "
                                 f"{self.num_prompts} prompts")
            return a[..., self.layout.num_prefix_tokens + query[1], :]
        if isinstance(query, tuple) and query and query[0] == "patch":
            r, c = query[1], query[2]
            j = r * self.grid[1] + c
            if self.source is None:
                return a[..., p + j, :]
            src = self.source[:, j]
            idx = src.clamp_min(0).view(-1, *([1] * (a.ndim - 1))).expand(*a.shape[:-2], 1, a.shape[-1])
            keep = (src >= 0).to(a.dtype).view(-1, *([1] * (a.ndim - 2)))
            return a.gather(-2, idx).squeeze(-2) * keep  # a dropped patch has no query row: zeros
        raise ValueError(f"attention: unknown `query` {query!r}; use 'cls', 'mean', ('prefix', i), "
                         "('prompt', i), ('patch', r, c) or an int")

    def _token_weighted_mean(self, rows: torch.Tensor) -> torch.Tensor:
        if self.sizes is None:
            return rows.mean(-2)
        w = self.sizes[:, self.num_prefix_tokens:, 0].to(rows.dtype)  # (B, T)
        w = w.view(w.shape[0], *([1] * (rows.ndim - 3)), w.shape[1], 1)
        return (rows * w).sum(-2) / w.sum(-2)

    def to_grid(self, values: torch.Tensor, share: bool = True) -> torch.Tensor:
        """Key-side values (B, ..., N) -> patch map (B, ..., gh, gw); prefix and prompt columns dropped.

        After token reduction a merged token's value is shared equally by the patches it stands for (divided
        by its size), so a map's total mass over patches is preserved; `share=False` copies it to each of its
        patches instead (features).
        """
        gh, gw = self.grid
        v = values[..., self.num_prefix_tokens:]
        if self.source is not None:
            if self.sizes is not None and share:
                v = v / self.sizes[:, self.num_prefix_tokens:, 0].to(v.dtype).view(
                    v.shape[0], *([1] * (v.ndim - 2)), -1)
            rel = self.source - self.num_prefix_tokens  # negative: the patch's token was dropped (-1)
            idx = rel.clamp_min(0).view(v.shape[0], *([1] * (v.ndim - 2)), -1)
            keep = (self.source >= 0).to(v.dtype).view(v.shape[0], *([1] * (v.ndim - 2)), -1)
            v = v.gather(-1, idx.expand(*v.shape[:-1], gh * gw)) * keep
        if v.shape[-1] != gh * gw:
            raise ValueError(f"attention: block {self.index} has {v.shape[-1]} tokens for the {gh}x{gw} patches and "
                             "no source map says which patches each stands for (tome with unmerge=False keeps "
                             "none): there is no per-patch map; apply tome with unmerge=True (the default)")
        return v.reshape(*v.shape[:-1], gh, gw)

    def patch_map(self, query: Query = "cls", head: HeadReduce = "mean") -> torch.Tensor:
        """(B, gh, gw) attention from `query` to every patch (heads fused by `head`)."""
        return self.to_grid(self.query_rows(self.heads(head), query))

    def patch_tokens(self, which: str) -> torch.Tensor:
        """(B, h*d, gh, gw) queries, keys or values (`which` = 'q', 'k', 'v'; heads concatenated) of the patches,
        prefix and prompt tokens dropped; a merged token's vector is copied to each of its patches. Needs
        `capture(..., tokens=True)`."""
        t = getattr(self, which)
        if t is None:
            raise ValueError(f"attention: block {self.index} kept no {which!r} tokens; capture with tokens=True")
        return self.to_grid(t.transpose(1, 2).flatten(2).transpose(1, 2), share=False)

    def region_attention(self, region, score: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, h, gh, gw) attention from a region of patches to every patch, per head (ViTGaze's taps).

        `region`: a box (x0, y0, x1, y1) in input pixels or patch weights (gh, gw) / (B, gh, gw); `score`: optional
        (B, gh, gw) logits turned into weights by a softmax over the box. See `vitkit.explain.region`.
        """
        from .region import region_attention

        return region_attention(self, region, score)


class AttentionMaps(dict):
    """`{block index: LayerAttention}` of one forward, plus the forward's `output` (the model's logits)."""

    output: Optional[torch.Tensor] = None
    depth: int = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self)

    def region_attention(self, region, score: Optional[torch.Tensor] = None, layers=None) -> torch.Tensor:
        """(B, |layers|·h, gh, gw) attention from a region to the scene, blocks in order then heads (ViTGaze's
        M); `layers` default all captured. See `LayerAttention.region_attention`."""
        idx = self.layers if layers is None else [select(self, i).index for i in layers]
        return torch.cat([self[i].region_attention(region, score) for i in idx], dim=1)


def _resolve_layers(model: nn.Module, layers) -> list[int]:
    depth = len(model.blocks)
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if not -depth <= int(i) < depth:
            raise ValueError(f"attention: layer {i} out of range for a model with {depth} blocks")
        out.append(int(i) % depth)
    return sorted(set(out))


def _softmax_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask, is_causal: bool) -> torch.Tensor:
    """Eager softmax of what SDPA sees: q, k (B, h, N, d) after q/k-norm, plus the same additive mask."""
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        if mask.dtype == torch.bool:  # SDPA convention: True = attend
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
    if is_causal:
        n = logits.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1)


def _check_attention(model: nn.Module, i: int, values: bool = False) -> nn.Module:
    attn = getattr(model.blocks[i], "attn", None)
    needed = ("q_norm", "k_norm", "scale", "qkv", "num_heads") + (("norm",) if values else ())
    missing = [n for n in needed if not hasattr(attn, n)]
    if attn is None or missing:
        raise NotImplementedError(
            f"attention: block {i}'s attention ({type(attn).__name__}) lacks {missing or ['attn']}; vitkit reads "
            "q/k at timm's `Attention.q_norm`/`k_norm` (RoPE/fused-qkv variants are not supported)")
    refusal = getattr(attn.__dict__.get("forward"), "capture_refusal", None)  # a method's own eager attention
    if refusal:
        raise NotImplementedError(f"{refusal} (block {i})")
    return attn


@contextmanager
def capture(model: nn.Module, layers=None, values: bool = False, tokens: bool = False,
            softmax: bool = True) -> Iterator[AttentionMaps]:
    """Context manager: forwards run inside it fill the yielded `AttentionMaps` (last forward wins).

    Hooks are read-only and removed on exit, also after an exception. Gradients flow through the recomputed
    maps when grad is enabled (q and k are the block's own tensors). `values=True` also keeps each layer's
    values V (from `attn.qkv`) and the attention output A·V (the input of `attn.norm`, an `nn.Identity` unless
    `scale_norm`), so that `LayerAttention.attn_grad` gives ∂y/∂A under fused attention. `tokens=True` keeps
    q, k (after q/k-norm) and V (`LayerAttention.patch_tokens`); `softmax=False` skips the O(h·N²) attention
    (`attn` is None), for callers that only want the tokens.
    """
    from vitkit.models.runner import has_runner, get_runner, no_checkpointing

    maps = AttentionMaps()
    maps.depth = len(model.blocks)
    idx = _resolve_layers(model, layers)
    layout = token_layout(model)
    handles = []
    pending: dict[int, dict] = {}

    def pre_attn(i):
        def hook(module, args, kwargs):
            x = args[0]
            state = get_runner(model).state if has_runner(model) else None
            grid = state.grid if state is not None else pending.get("grid", layout.grid_size)
            pending[i] = dict(mask=kwargs.get("attn_mask"), is_causal=bool(kwargs.get("is_causal", False)),
                              grid=tuple(grid), num_prompts=state.num_prompts if state is not None else 0,
                              source=None if state is None or state.source is None else state.source.clone(),
                              sizes=None if state is None or state.sizes is None else state.sizes.clone(),
                              n=x.shape[1])
        return hook

    def on_q(i):
        def hook(module, args, out):
            pending[i]["q"] = out
        return hook

    def on_k(i, attn):
        def hook(module, args, out):
            rec = pending[i]
            q = rec.pop("q")
            a = _softmax_attention(attn, q, out, rec["mask"], rec["is_causal"]) if softmax else None
            la = maps[i] = LayerAttention(i, a, layout, rec["grid"], rec["num_prompts"], rec["source"], rec["sizes"])
            if tokens:
                la.q, la.k, la.v = q, out, rec["v"]
            if not values:
                pending.pop(i)
        return hook

    def on_qkv(i, attn):
        def hook(module, args, out):
            B, N = out.shape[:2]
            pending[i]["v"] = out.reshape(B, N, 3, attn.num_heads, -1)[:, :, 2].transpose(1, 2)
        return hook

    def on_out(i):
        def hook(module, args):
            rec = pending.pop(i)
            maps[i].v, maps[i].out = rec["v"], args[0]
        return hook

    def on_embed(module, args, out):
        pending["grid"] = layout.grid(tuple(args[0].shape[-2:]))

    try:
        handles.append(model.patch_embed.register_forward_hook(on_embed))
        for i in idx:
            attn = _check_attention(model, i, values)
            handles.append(attn.register_forward_pre_hook(pre_attn(i), with_kwargs=True))
            handles.append(attn.q_norm.register_forward_hook(on_q(i)))
            handles.append(attn.k_norm.register_forward_hook(on_k(i, attn)))
            if values or tokens:
                handles.append(attn.qkv.register_forward_hook(on_qkv(i, attn)))
            if values:
                handles.append(attn.norm.register_forward_pre_hook(on_out(i)))
        with no_checkpointing(model):  # the hooks add autograd ops in the blocks and are gone before any backward
            yield maps
    finally:
        for h in handles:
            h.remove()


def attention(model: nn.Module, x: torch.Tensor, layers: Union[None, int, Iterable[int]] = None,
              grad: bool = False) -> AttentionMaps:
    """Per-layer softmax attention (B, heads, N, N) of `model` on `x`, with fused attention left on.

    Args:
        model: a timm VisionTransformer (vitkit methods applied or not).
        x: (B, C, H, W) normalised images; any size the model accepts (`dynamic_img_size`).
        layers: block indices (negative allowed); all blocks when None.
        grad: keep the autograd graph (for gradient × attention); otherwise runs under `no_grad`.

    Returns:
        `AttentionMaps`: `{block index: LayerAttention}` with `.output` the model's logits; each
        `LayerAttention` knows its token layout (`patch_map(query=, head=)`, `to_grid`).
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), capture(model, layers) as maps:
        out = model(x)
    maps.output = out
    return maps


def fused_flags(model: nn.Module) -> list[bool]:
    """`fused_attn` of every block's attention (for checks that nothing was flipped)."""
    return [bool(getattr(b.attn, "fused_attn", False)) for b in model.blocks]


def select(maps: AttentionMaps, layer: int) -> LayerAttention:
    """`maps[layer]` with negative indices counted from the model's depth."""
    if layer in maps:
        return maps[layer]
    if maps.depth and -maps.depth <= layer < 0 and layer % maps.depth in maps:
        return maps[layer % maps.depth]
    raise ValueError(f"attention: layer {layer} was not captured (captured: {sorted(maps)}); capture it with "
                     "`layers=` (all blocks when None)")


__all__ = ["attention", "capture", "select", "AttentionMaps", "LayerAttention", "fused_flags"]
