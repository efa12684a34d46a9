"""Attention locality: the mean attention distance of every head (ConViT's non-locality metric).

Paper: *ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases* (d'Ascoli et al., ICML
2021), arXiv:2103.10697, §4 "non-locality": for a head with attention A over the patch grid,
D = (1/N) Σ_q Σ_k A_qk ‖δ_qk‖, δ_qk the offset from query patch q to key patch k (in patches), averaged over
images. A convolution-like head scores near its kernel radius, a head attending everywhere near the grid's mean
pairwise distance.

*Plugs in at.* Read-only. A timm `VisionTransformer`: `vk.attention` (q/k hooks, fused attention kept); timm's
`ConVit`: forward hooks on each block's `attn` recompute the gated attention with the module's own
`get_attention` (GPSA) or softmax(q kᵀ · scale) (MHSA). Prefix keys (class token, registers, prompts) are dropped
and each row renormalised over the patch keys, so a head's distance is over the patches it attends to.
Other backbones (CNNs, windowed attention) have no global attention map: `NotImplementedError`.
*Hand-written here, and why:* timm's `get_attention_map` exists for ConViT only and assumes a square grid without
prefix tokens; the metric is one weighted sum.

Spec: ../shared/methods/augment-pretrain.md §F, applications.md entry 32. Docs: docs/backbones.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def grid_distances(grid: tuple[int, int]) -> torch.Tensor:
    """(P, P) Euclidean distance, in patches, between the patches of a row-major (gh, gw) grid."""
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    return ((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2).sqrt()


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h,) mean attention distance per head, in patches.

    Args:
        attn: (B, h, P, P) attention among the P = gh·gw patches (row-major); rows are renormalised to sum to 1.
        grid: (gh, gw).
    """
    if attn.shape[-1] != grid[0] * grid[1] or attn.shape[-2] != attn.shape[-1]:
        raise ValueError(f"locality: attention of shape {tuple(attn.shape)} does not cover a {grid[0]}x{grid[1]} grid")
    a = attn.double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    return (a * grid_distances(grid).to(a.device)).sum(-1).mean((0, 2)).float()  # Σ_k, then mean over B and q


def _vit_maps(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, tuple[int, int]]]:
    from .attention import attention

    maps = attention(model, x)
    out = {}
    for i, layer in maps.items():
        p = layer.num_prefix_tokens
        if layer.source is not None or layer.attn.shape[-1] - p != layer.grid[0] * layer.grid[1]:
            raise NotImplementedError(f"locality: block {i} holds merged or dropped tokens (token reduction); "
                                      "measure the model without it")
        out[i] = (layer.attn[:, :, p:, p:], layer.grid)
    return out


def _convit_maps(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, tuple[int, int]]]:
    grid = tuple(model.patch_embed.grid_size)  # ConViT takes its own input size only
    P = grid[0] * grid[1]
    out, handles = {}, []

    def hook(i):
        def post(module, args, output):  # after the forward, which caches GPSA's relative positions
            tokens = args[0]
            if hasattr(module, "get_attention"):  # GPSA: gated content + positional attention
                a = module.get_attention(tokens)
            else:  # MHSA after the class token joins
                B, N, C = tokens.shape
                qkv = module.qkv(tokens).reshape(B, N, 3, module.num_heads, C // module.num_heads).permute(2, 0, 3, 1, 4)
                a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * module.scale).softmax(-1)
            p = a.shape[-1] - P
            out[i] = (a[:, :, p:, p:], grid)
        return post

    for i, block in enumerate(model.blocks):
        handles.append(block.attn.register_forward_hook(hook(i)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def attention_locality(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """{block index: (h,) mean attention distance per head, in patches} of `model` on images `x` (B, C, H, W).

    Raises:
        NotImplementedError: the model has no global attention map (a CNN, windowed attention), or its tokens
            are merged / dropped by a token-reduction method.
    """
    from timm.models.convit import ConVit
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        maps = _vit_maps(model, x)
    elif isinstance(model, ConVit):
        maps = _convit_maps(model, x)
    else:
        raise NotImplementedError(f"locality: a {type(model).__name__} has no global attention map over patches "
                                  "(it works on timm VisionTransformer and ConVit)")
    with torch.no_grad():
        return {i: mean_attention_distance(a, grid) for i, (a, grid) in sorted(maps.items())}

