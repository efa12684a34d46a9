"""`vk.explain(model, image, method=...)`: attention, attention rollout and Grad-CAM as heatmaps.

Every method returns an `Explanation`: the raw patch map on the current grid (registers, class token and prompts
dropped; merged tokens mapped back through the source map) and a heatmap bilinearly upsampled to the input
resolution and divided by its maximum. Fused attention stays on throughout (`attention.py`).

Spec: ../shared/methods/explain.md (E1, E2). Docs: docs/explain.md.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from . import rollout_algo
from .attention import LayerAttention, attention, select
from .image import ImageLike, normalise_max, overlay, prepare, save_pair, upsample

_log = logging.getLogger("vitkit")
METHODS = ("attention", "rollout", "grad_rollout", "gradcam", "bcos", "prompt-cam")


@dataclass
class Explanation:
    """What `vk.explain` returns.

    Attributes:
        method: the explanation method.
        heatmap: (B, H, W) map at input resolution, values in [0, 1].
        patch_map: (B, gh, gw) raw map on the patch grid (before normalisation).
        target: class indices explained (gradcam), else None.
        image: the resized RGB image the input shows (None when a tensor was passed).
        logits: (B, num_classes) model output of the explained forward, when available.
    """

    method: str
    heatmap: torch.Tensor
    patch_map: torch.Tensor
    target: Optional[list[int]] = None
    image: Optional[Image.Image] = None
    logits: Optional[torch.Tensor] = None
    head_maps: Optional[torch.Tensor] = None  # prompt-cam: (B, heads, gh, gw) trait map of every head
    head_ranking: Optional[torch.Tensor] = None  # prompt-cam: (B, heads) head indices, most important first

    def overlay(self, index: int = 0, alpha: float = 0.5, size: Optional[tuple[int, int]] = None) -> Image.Image:
        """The heatmap of sample `index` blended over its image (grey canvas when there is none), at `size`
        (H, W; default the input's): the image is resized bicubically, the heatmap bilinearly."""
        heat = self.heatmap[index:index + 1].detach().float()
        if size is not None:
            heat = upsample(heat, tuple(size))
        heat = heat[0].cpu().numpy()
        base = self.image if self.image is not None else Image.new("RGB", heat.shape[::-1], (128, 128, 128))
        if base.size != heat.shape[::-1]:
            base = base.resize(heat.shape[::-1], Image.BICUBIC)
        return overlay(base, heat, alpha=alpha)

    def save(self, path: Union[str, Path], index: int = 0, size: Optional[tuple[int, int]] = None
             ) -> tuple[Path, Path]:
        """Write the overlay PNG at `path` (at `size`, see `overlay`) and the raw patch map next to it (`.npy`)."""
        return save_pair(self.overlay(index, size=size), self.patch_map[index].detach().cpu().numpy(), path)


def _expand(la: LayerAttention, a: torch.Tensor) -> torch.Tensor:
    """(B, N', N') head-fused attention `a` of `la` put on the full [prefix | prompts | patches] sequence.

    After token reduction token t stands for the patches that `source` maps to it: full row i copies the row of
    i's token, and a column gets its token's attention divided by the token's size, so rows still sum to 1
    (when `sizes` counts the patches of each token). A dropped patch (-1) gets a zero column and an identity row.
    """
    if la.source is None:
        return a
    B, P = a.shape[0], la.num_prefix_tokens
    s = torch.cat([torch.arange(P, device=a.device).expand(B, P), la.source], dim=1)  # (B, N'); -1: dropped
    keep = (s >= 0).to(a.dtype)
    s = s.clamp_min(0)
    a = a.gather(1, s.unsqueeze(-1).expand(B, s.shape[1], a.shape[-1]))
    if la.sizes is not None:
        a = a / la.sizes[..., 0].to(a.dtype).unsqueeze(1)
    a = a.gather(2, s.unsqueeze(1).expand(B, s.shape[1], s.shape[1])) * keep.unsqueeze(1)
    # a dropped patch is attended by no one; its own row is the identity (rows keep summing to 1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.where(keep.unsqueeze(-1) > 0, a, eye.expand(B, -1, -1))


def rollout_map(maps, head_fusion: str = "mean", discard_ratio: float = 0.0, legacy: bool = False,
                grads: Optional[dict] = None) -> torch.Tensor:
    """(B, gh, gw) rollout map from captured attention (all layers, first to last), divided by its maximum.

    Query: the class token's row; models without one use the mean of the patch rows. Patch columns only.
    `grads` ({layer: ∂y/∂A}) gives gradient rollout: each layer's attention is weighted by the positive part of
    its gradient before the head fusion.
    """
    layers = [maps[i] for i in sorted(maps)]
    first = layers[0]
    for la in layers:
        require_patch_map(la, "rollout" if grads is None else "grad_rollout")
    fused = [la.attn if grads is None else la.attn * grads[la.index].clamp_min(0) for la in layers]
    full = [_expand(la, rollout_algo.fuse_heads(a, head_fusion)) for la, a in zip(layers, fused)]
    if len({a.shape[-1] for a in full}) != 1:
        raise NotImplementedError(f"rollout: the number of prompt tokens changes across blocks "
                                  f"({[la.num_prompts for la in layers]}); rollout needs one token set")
    cls = first.layout.cls_index
    R = rollout_algo.rollout(full, head_fusion=head_fusion, discard_ratio=discard_ratio, protect=cls, legacy=legacy)
    P = first.num_prefix_tokens
    row = R[:, cls] if cls is not None else R[:, P:].mean(1)
    m = row[:, P:].reshape(row.shape[0], *first.grid)
    if (m.flatten(1).amax(1) <= 0).any():
        warnings.warn("rollout: the query keeps all its mass on prefix tokens (e.g. identity attention); "
                      "the patch map is all zeros", RuntimeWarning, stacklevel=2)
    return normalise_max(m)


def explain(model: nn.Module, image: Union[ImageLike, torch.Tensor], method: str = "rollout",
            target: Union[None, int, Sequence[int]] = None, *, layer: Optional[int] = None,
            head: Union[str, int] = "mean",
            query="cls", head_fusion: str = "mean", discard_ratio: float = 0.0, legacy_vit_explain: bool = False,
            size: Union[None, int, Sequence[int]] = None, mean=None, std=None, top_traits: int = 1) -> Explanation:
    """Explain what `model` looks at in `image`.

    Args:
        model: a timm VisionTransformer (adapters / token reduction applied or not); fused attention stays on.
        image: a path, PIL image or array (through `vk.data.transform(model)`, the training/evaluation resize,
            centre crop and normalisation; `size`, `mean`, `std` override its data config), or a normalised
            tensor (C, H, W) / (B, C, H, W).
        method: 'attention' (one layer's attention from `query` to the patches, heads fused by `head`),
            'rollout' (Abnar & Zuidema 2020; `head_fusion`, `discard_ratio`), 'grad_rollout' (each layer's
            attention weighted by the positive part of ∂y_target/∂A before the head fusion), 'gradcam'
            (pytorch-grad-cam on `blocks[layer].norm1`), 'bcos' (a B-cosified model's exact contribution map,
            returned as a `BcosExplanation`: `vitkit/explain/bcos.py`) or 'prompt-cam' (a Prompt-CAM model: the
            target class prompt's last-layer attention per head, heads ranked by greedy blurring; `patch_map` is
            the mean of the `top_traits` most important heads, `head_maps` and `head_ranking` hold all of them).
        target: class index (gradcam, grad_rollout, bcos, prompt-cam; `ValueError` outside 0..num_classes-1);
            default the prediction. Ignored (and logged) by the class-agnostic 'attention' and 'rollout'.
        top_traits: heads averaged into the 'prompt-cam' map.
        layer: block for 'attention' and 'gradcam' (default the last, -1); the other methods use every layer
            (rollout) or the last (bcos, prompt-cam) and refuse it.
        head: 'mean', 'max', 'min' or a head index ('attention').
        query: 'cls' (falls back to the mean of patch queries without a class token), 'mean', or see
            `LayerAttention.query_rows`.
        legacy_vit_explain: reproduce vit-explain's row-normalisation bug (rollout; for comparisons only).
        size: input size (H, W) for images given as files/arrays; default the model's.

    Returns:
        `Explanation` with `heatmap` (B, H, W) in [0, 1] and `patch_map` (B, gh, gw).
    """
    if method not in METHODS:
        raise ValueError(f"explain: unknown `method` {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("gradcam", "grad_rollout", "bcos", "prompt-cam"):
        check_target(model, target, method)
    if layer is not None and method not in ("attention", "gradcam"):
        raise ValueError(f"explain: `layer` chooses the block of 'attention' and 'gradcam'; {method!r} does not take "
                         "one (rollout multiplies every layer's attention): leave it out")
    layer = -1 if layer is None else layer
    x, pil = prepare(model, image, size=size, mean=mean, std=std)
    H, W = x.shape[-2:]
    was_training = model.training
    model.eval()
    try:
        if method == "gradcam":
            patch_map, heat, ids = _gradcam(model, x, target, layer)
            return Explanation(method, heat, patch_map, ids, pil)
        if method == "bcos":
            from .bcos import bcos_explain

            return bcos_explain(model, x, target, pil)
        if method == "prompt-cam":
            return _prompt_cam(model, x, target, top_traits, pil)
        if target is not None and method in ("attention", "rollout"):
            _log.info("explain: `target` is ignored by the class-agnostic method %r (gradcam and grad_rollout "
                      "use it)", method)
        if method == "attention":
            maps = attention(model, x, layers=[layer])
            patch_map = select(maps, layer).patch_map(query=query, head=head)
        elif method == "grad_rollout":
            maps, grads, ids = attention_gradients(model, x, target)
            patch_map = rollout_map(maps, head_fusion, discard_ratio, legacy_vit_explain, grads=grads)
            heat = normalise_max(upsample(patch_map, (H, W)).clamp_min(0))
            return Explanation(method, heat, patch_map.detach(), ids, pil, maps.output.detach())
        else:
            maps = attention(model, x)
            patch_map = rollout_map(maps, head_fusion, discard_ratio, legacy_vit_explain)
    finally:
        model.train(was_training)
    heat = normalise_max(upsample(patch_map, (H, W)).clamp_min(0))
    return Explanation(method, heat, patch_map, None, pil, maps.output)


def check_target(model: nn.Module, target, method: str) -> None:
    """A `ValueError` naming the value and the valid range unless `target` is None or class indices of `model`."""
    if target is None:
        return
    ids = [target] if isinstance(target, (int, np.integer)) or (
        isinstance(target, torch.Tensor) and target.ndim == 0) else list(target)
    n = getattr(model, "num_classes", None)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer, torch.Tensor)) or int(t) != t:
            raise ValueError(f"explain: `target` must be a class index (int), got {t!r} ({method})")
        if int(t) < 0 or (isinstance(n, int) and n > 0 and int(t) >= n):
            raise ValueError(f"explain: `target` {int(t)} is not a class of this model (it has "
                             f"{n} classes: 0..{n - 1}); pass a class index in that range or leave it unset to "
                             f"explain the prediction ({method})")


def require_patch_map(la: LayerAttention, method: str) -> None:
    """Refuse, with the reason, a block whose tokens cannot be put back on the patch grid: token reduction that
    merged or dropped tokens without keeping the source map (ToMe with `unmerge=False`)."""
    gh, gw = la.grid
    tokens = la.attn.shape[-1] - la.num_prefix_tokens
    if la.source is None and tokens != gh * gw:
        raise NotImplementedError(
            f"{method}: block {la.index} holds {tokens} tokens for the {gh}x{gw} = {gh * gw} patches and no "
            "source map says which patches each token stands for: the token reduction was applied without "
            "keeping it (tome with unmerge=False), so there is no per-patch map. Apply it with the source map "
            "kept (tome: unmerge=True, the default) to explain the model")


def attention_gradients(model: nn.Module, x: torch.Tensor, target=None):
    """Attention of every layer and its gradient ∂y_target/∂A (B, h, N, N), with fused attention kept.

    The gradient comes from the SDPA output: ∂y/∂A = ∂y/∂(A·V) · Vᵀ (`LayerAttention.attn_grad`), so no
    eager attention is run and no parameter gradient is accumulated (`torch.autograd.grad` on the outputs only).
    Returns (maps, {layer: grad}, target ids).
    """
    from .attention import capture

    x = x.detach().requires_grad_(True)  # a graph even when every parameter is frozen
    with torch.enable_grad(), capture(model, values=True) as maps:
        out = model(x)
    ids = out.argmax(-1).tolist() if target is None else (
        [int(target)] * x.shape[0] if isinstance(target, int) else [int(t) for t in target])
    score = out.gather(1, torch.tensor(ids, device=out.device).view(-1, 1)).sum()
    layers = sorted(maps)
    g_out = torch.autograd.grad(score, [maps[i].out for i in layers])
    grads = {i: maps[i].attn_grad(g).detach() for i, g in zip(layers, g_out)}
    for i in layers:
        la = maps[i]
        la.attn, la.v, la.out = la.attn.detach(), None, None
    maps.output = out.detach()
    return maps, grads, ids


def _gradcam(model, x, target, layer):
    from .cams import gradcam

    return gradcam(model, x, target=target, layer=layer)


def _prompt_cam(model, x, target, top_traits, pil) -> Explanation:
    from . import prompt_cam

    heads = model.blocks[-1].attn.num_heads
    if isinstance(top_traits, bool) or not isinstance(top_traits, int) or not 1 <= top_traits <= heads:
        raise ValueError(f"explain: `top_traits` must be an int in 1..{heads} (the last block's heads), got "
                         f"{top_traits!r}")
    out = prompt_cam.maps(model, x, target)
    top = out["ranking"][:, :top_traits]
    chosen = out["head_maps"].gather(1, top[:, :, None, None].expand(-1, -1, *out["head_maps"].shape[-2:]))
    patch_map = chosen.mean(1)
    heat = normalise_max(upsample(patch_map, tuple(x.shape[-2:])).clamp_min(0))
    return Explanation("prompt-cam", heat, patch_map, out["target"], pil, out["logits"], out["head_maps"],
                       out["ranking"])
