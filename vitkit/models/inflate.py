"""Patch-embedding inflation: the one helper behind every input adapter (channels, spectrogram, paired, video,
points). Spec: ../shared/methods/applications.md §2.

A ViT pretrained on RGB photos meets other inputs (10-band satellite tiles, 1-channel spectrograms, image pairs,
clips, point clouds) at its patch embedding only. The adapters change it here, and nowhere else:

* **channels** (`inflate_weight` + `replace_input_conv`): a Conv2d with N input channels whose kernels come from
  the pretrained ones, channel by channel: a pretrained channel's kernel (R, G or B), the mean kernel, zero, or
  the 1-channel sum (timm's `adapt_input_conv(1, w)`);
* **grid** (`resize_grid`): another (possibly non-square) input size, the position embedding resampled with
  timm's `resample_abs_pos_embed`;
* **token embeddings** (`install_embed`): a module replacing `patch_embed` that turns a clip or a point cloud into
  tokens. It provides `forward(x)`, `position(out, model) -> (B, N, D)` (adds positions taken from the model's
  2-D grid) and `token_grid(x) -> (rows, cols)` (the token grid the block runner records). The model's
  `_pos_embed` is replaced by `_adapter_pos_embed`, which calls `position` and prepends the prefix tokens exactly
  as timm does (their position embedding when `pos_embed` covers them).

Refused: patch embeddings whose projection is not a Conv2d (already wrapped by `ssf`, or a Linear stem), models
without a learned absolute `pos_embed` where positions are needed. Hand-written because timm converts weights
(`adapt_input_conv`) and position embeddings (`resample_abs_pos_embed`) at load time only, for the same input
kind; no maintained library inflates a live model to clips or point clouds.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv

from .runner import _Bound

Source = Union[int, str]  # a pretrained channel index, "mean", "zero" or "sum"


def input_conv(model: nn.Module, method: str) -> nn.Conv2d:
    """The patch embedding's Conv2d (`model.patch_embed.proj`), or a `NotImplementedError` naming `method`."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise NotImplementedError(
            f"{method}: needs a timm patch embedding whose `proj` is a Conv2d, got {type(proj).__name__}; apply "
            "input adapters first, before methods that wrap the patch embedding (ssf) or another input adapter")
    return proj


def inflate_weight(weight: torch.Tensor, sources: Sequence[Source]) -> torch.Tensor:
    """Kernels `(O, len(sources), ph, pw)` from pretrained kernels `weight` `(O, C, ph, pw)`.

    Each source is a pretrained channel index (its kernel, unchanged), "mean" (the mean kernel over the pretrained
    channels), "zero", or "sum" (the sum over channels: timm's 1-channel rule, so a grey image gives what the
    pretrained model gives on the grey image replicated to every channel, under equal per-channel normalisation).
    """
    c = weight.shape[1]
    total = adapt_input_conv(1, weight, base_chans=c)  # (O, 1, ph, pw): sum over the pretrained channels
    kernels = []
    for s in sources:
        if isinstance(s, int):
            if not 0 <= s < c:
                raise ValueError(f"inflate: source channel {s} out of range for {c} pretrained channels")
            kernels.append(weight[:, s:s + 1])
        elif s == "sum":
            kernels.append(total)
        elif s == "mean":
            kernels.append(total / c)
        elif s == "zero":
            kernels.append(torch.zeros_like(total))
        else:
            raise ValueError(f"inflate: unknown source {s!r}; use a channel index, 'mean', 'zero' or 'sum'")
    return torch.cat(kernels, dim=1)


def inflate_stats(values: Sequence[float], sources: Sequence[Source]) -> tuple[float, ...]:
    """Per-channel normalisation (mean or std) for the inflated channels: a pretrained channel keeps its value,
    the others take the mean over the pretrained channels."""
    avg = sum(values) / len(values)
    return tuple(float(values[s]) if isinstance(s, int) else float(avg) for s in sources)


def replace_input_conv(model: nn.Module, sources: Sequence[Source], method: str,
                       stats: Sequence[Source] | None = None) -> nn.Conv2d:
    """Swap `patch_embed.proj` for a Conv2d with one input channel per source (kernels from `inflate_weight`,
    bias kept), and give the model per-channel normalisation to match (`inflate_stats` of `stats`, by default
    of `sources`)."""
    from .loading import set_data_config

    old = input_conv(model, method)
    new = nn.Conv2d(len(sources), old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(inflate_weight(old.weight, sources))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.train(old.training)
    model.patch_embed.proj = new
    cfg = getattr(model, "pretrained_cfg", None) or {}
    stats = sources if stats is None else stats
    set_data_config(model, **{k: inflate_stats(cfg[k], stats) for k in ("mean", "std")
                              if len(cfg.get(k) or ()) == old.in_channels})
    return new


def resize_grid(model: nn.Module, img_size: tuple[int, int], method: str) -> None:
    """Make the model take `img_size` (H, W) inputs: the patch grid and `pos_embed` resampled to it (bicubic,
    timm's `resample_abs_pos_embed`), prefix entries kept."""
    pe = model.patch_embed
    ph, pw = pe.patch_size
    h, w = img_size
    if h < ph or w < pw or h % ph or w % pw:
        raise ValueError(f"{method}: `img_size` {h}x{w} must be a positive multiple of the patch size {ph}x{pw}")
    grid = (h // ph, w // pw)
    if tuple(pe.grid_size) == grid:
        return
    if getattr(model, "pos_embed", None) is not None:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        new = resample_abs_pos_embed(model.pos_embed.data, list(grid), old_size=list(pe.grid_size),
                                     num_prefix_tokens=prefix)
        model.pos_embed = nn.Parameter(new, requires_grad=model.pos_embed.requires_grad)
    pe.img_size, pe.grid_size, pe.num_patches = (h, w), grid, grid[0] * grid[1]


def grid_pos_embed(model: nn.Module) -> torch.Tensor:
    """The patch part of `pos_embed` as a 2-D map `(1, D, gh, gw)` at the pretrained grid."""
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        raise NotImplementedError("inflate: the model has no learned absolute position embedding (`pos_embed`)")
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    gh, gw = model.patch_embed.pretrained_grid
    return pos[:, prefix:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)


def _adapter_pos_embed(model: nn.Module, out) -> torch.Tensor:
    """`model._pos_embed` of a model whose `patch_embed` is a token embedding: positions, then prefix tokens."""
    x = model.patch_embed.position(out, model)  # (B, N, D)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if model.pos_embed is not None and not model.no_embed_class:
            prefix = prefix + model.pos_embed[:, :model.num_prefix_tokens]
        x = torch.cat([prefix.to(x.dtype), x], dim=1)
    return model.pos_drop(x)


def install_embed(model: nn.Module, embed: nn.Module, method: str) -> None:
    """Replace `model.patch_embed` by a token embedding (see the module docstring) and route `_pos_embed`."""
    if getattr(model, "pos_embed", None) is None:
        raise NotImplementedError(f"{method}: needs a learned absolute position embedding (`pos_embed`) to take "
                                  "positions from; this model has none")
    embed.pretrained_grid = tuple(model.patch_embed.grid_size)
    embed.train(model.patch_embed.training)
    model.patch_embed = embed
    model._pos_embed = _Bound(_adapter_pos_embed, model)


def grid_pos_at(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The patch position embedding `(1, gh*gw, D)` resampled (bicubic) from the pretrained grid to `grid`."""
    pos = grid_pos_embed(model)  # (1, D, gh0, gw0)
    flat = pos.flatten(2).transpose(1, 2)
    return resample_abs_pos_embed(flat, list(grid), old_size=list(pos.shape[-2:]), num_prefix_tokens=0)


def check_ndim(x: torch.Tensor, ndim: int, what: str, method: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{method}: expected {what}, got a tensor of shape {tuple(x.shape)}")
