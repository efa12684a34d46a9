"""Volume segmentation by patch-feature similarity: click a voxel, get a 3-D mask (neural transfer functions).

Paper: *Leveraging Self-Supervised Vision Transformers for Segmentation-based Transfer Function Design* (Engel,
Sick, Ropinski; IEEE TVCG 2024), arXiv:2309.01408. *Claim implemented:* a frozen ViT applied slice by slice along
the three axes of a volume gives a 3-D feature volume in which a few clicked voxels find their structure by
cosine similarity, with no training: the volume is min-max normalised, each slice (3 channels, the model's
normalisation) is resized (nearest) so the middle-sized axis spans `patches` patches, each slice's patch keys of
the last block are stacked, average-pooled along the slice axis to the common grid, and the three axes' grids
are summed; the similarity to a click (trilinearly sampled) is zeroed below a floor and raised to 2.5, reduced
over the clicks, and trilinearly upsampled to the volume.

*Plugs in at.* Read-only: the q/k/v taps of `attention.capture` (keys by default) or the final-normed tokens
(`segment.token_features`); the algorithm is `volume_algo.py` (torch only).
*Hand-written here, and why:* no maintained library builds feature volumes from a 2-D ViT; the reference
(xeTaiz/vit-tf) has no licence and is not used.
*Differs from the reference:* features are kept in the input dtype (the reference stores fp16); the uint8
transfer function is at full resolution (the reference halves it); the proximity prior, largest connected
component and bilateral solver are not implemented; DINO ViT-S/8 is not downloadable offline, so the docs use
vitkit's embedded CIFAR model.

Spec: ../shared/methods/explain.md (E6). Docs: docs/explain.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from vitkit.models.layout import token_layout

from . import volume_algo as algo
from .image import norm_stats
from .segment import check_feature, token_features

VolumeLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]
AXES = (0, 1, 2)


def load_volume(volume: VolumeLike) -> np.ndarray:
    """A 3-D float32 array from a NIfTI / any file nibabel reads, a `.npy` file, an array or a tensor."""
    if isinstance(volume, (str, os.PathLike)):
        path = Path(volume)
        if not path.is_file():
            raise FileNotFoundError(f"segment_volume: no volume file {str(path)!r}")
        if path.suffix == ".npy":
            arr = np.load(path)
        else:
            import nibabel

            try:
                arr = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
            except Exception as err:  # nibabel raises its own ImageFileError and others on unreadable files
                raise ValueError(f"segment_volume: cannot read {str(path)!r} as a volume (nibabel: {err}); give a "
                                 "NIfTI / MGH / Analyze file or a .npy array") from None
    else:
        arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"segment_volume: expected a 3-D volume (D0, D1, D2), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("segment_volume: the volume holds NaN or infinite values; replace them first")
    return arr


@dataclass
class VolumeSegmentation:
    """What `vk.segment_volume` returns.

    Attributes:
        mask: (D0, D1, D2) bool, `similarity >= threshold`.
        similarity: (D0, D1, D2) similarity to the clicks in [0, 1] (floored, powered, upsampled).
        grid_similarity: (G0, G1, G2) the same on the feature grid.
        threshold: τ used.
        voxels: the clicked voxels (z, y, x).
        volume: (D0, D1, D2) the min-max normalised volume.
    """

    mask: np.ndarray
    similarity: np.ndarray
    grid_similarity: np.ndarray
    threshold: float
    voxels: list[tuple[int, int, int]]
    volume: np.ndarray

    def transfer_function(self) -> np.ndarray:
        """uint8 volume `255 / (0.99 · max) · similarity`, clamped (the transfer function's opacity)."""
        return algo.to_uint8(torch.from_numpy(self.similarity)).numpy()

    def plot(self, path: Union[str, Path], voxel: Optional[Sequence[int]] = None) -> Path:
        """PNG of the three planes through `voxel` (default the first click): the volume with the mask tinted red
        and the click in green (top), the similarity (bottom). Planes are drawn transposed, origin lower left."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        v = tuple(voxel if voxel is not None else self.voxels[0])
        fig, axes = plt.subplots(2, 3, figsize=(9, 6), dpi=90)
        for a in AXES:
            grey, mask, sim = (np.take(arr, v[a], axis=a).T for arr in (self.volume, self.mask, self.similarity))
            rgb = np.repeat(grey[..., None], 3, -1)
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array([1.0, 0.1, 0.1])
            col, row = (v[b] for b in AXES if b != a)
            axes[0, a].imshow(rgb, origin="lower", interpolation="nearest")
            axes[0, a].plot([col], [row], "s", color="lime", markersize=4)
            axes[0, a].set_title(f"axis {a} = {v[a]}: mask")
            axes[1, a].imshow(sim, origin="lower", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            axes[1, a].set_title(f"axis {a} = {v[a]}: similarity")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"click {v}, threshold {self.threshold:.3f}, mask {self.mask.mean():.1%} of the volume")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def save(self, path: Union[str, Path]) -> tuple[Path, Path]:
        """The three-plane PNG at `path` and the similarity volume (float32) next to it as `.npy`."""
        png = self.plot(path)
        npy = png.with_suffix(".npy")
        tmp = npy.with_name(npy.stem + ".tmp.npy")
        np.save(tmp, self.similarity)
        os.replace(tmp, npy)
        return png, npy


def _voxels(voxel, shape) -> list[tuple[int, int, int]]:
    """One click (z, y, x) or a sequence of clicks -> a list of int triples inside `shape`."""
    many = isinstance(voxel, (tuple, list, np.ndarray)) and len(voxel) > 0 and isinstance(
        voxel[0], (tuple, list, np.ndarray))
    out = []
    for v in (voxel if many else [voxel]):
        ok = isinstance(v, (tuple, list, np.ndarray)) and len(v) == 3 and all(
            isinstance(c, (int, np.integer)) or (isinstance(c, (float, np.floating)) and float(c).is_integer())
            for c in v)
        if not ok:
            raise ValueError(f"segment_volume: a voxel is three integer indices (z, y, x), got {v!r}")
        if not all(0 <= int(c) < n for c, n in zip(v, shape)):
            raise ValueError(f"segment_volume: voxel {tuple(v)} lies outside the volume of shape {tuple(shape)}")
        out.append(tuple(int(c) for c in v))
    return out


def volume_features(model: nn.Module, volume: torch.Tensor, patches: int = 64, layer: int = -1,
                    feature: str = "k", axes: Sequence[int] = AXES, mean=None, std=None, batch_size: int = 16,
                    progress: bool = True) -> torch.Tensor:
    """(C, G0, G1, G2) feature volume of a min-max normalised (D0, D1, D2) `volume`: each axis of `axes` sliced,
    every slice's patch features (`feature` of block `layer`) pooled along the slice axis, the axes summed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    layout = token_layout(model)
    ph, pw = layout.patch_size
    cells = algo.feature_grid(volume.shape, patches)
    for a in axes:  # every slice size first: a size the model cannot take fails before any work
        ga, gb = (cells[b] for b in AXES if b != a)
        try:
            layout.grid((ga * ph, gb * pw))
        except ValueError as err:
            raise ValueError(f"segment_volume: slices along axis {a} are fed at {ga * ph}x{gb * pw} px ({patches} "
                             f"patches along the middle axis): {err} (CLI: --model-arg dynamic_img_size=true)"
                             ) from None
    m, s = (torch.tensor(t, dtype=torch.float32).view(1, -1, 1, 1) for t in norm_stats(model, mean, std))
    param = next(model.parameters())
    total = None
    with Progress(TextColumn("[bold]segment-volume slices"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("", total=sum(volume.shape[a] for a in axes))
        for a in axes:
            ga, gb = (cells[b] for b in AXES if b != a)
            sl = algo.slices(volume, a, (ga * ph, gb * pw))
            per_slice = []
            for i in range(0, sl.shape[0], batch_size):
                x = (sl[i:i + batch_size].expand(-1, layout.in_chans, -1, -1) - m) / s
                per_slice.append(token_features(model, x.to(param.device, param.dtype), layer, feature).float().cpu())
                bar.advance(task, x.shape[0])
            f = algo.pool_slices(torch.cat(per_slice), a, cells[a])
            total = f if total is None else total + f
    return total


def segment_volume(model: nn.Module, volume: VolumeLike, voxel, *, patches: int = 64, layer: int = -1,
                   feature: str = "k", axes: Sequence[int] = AXES, floor: float = 0.25, power: float = 2.5,
                   reduce: str = "mean", threshold: float = 0.5, mean=None, std=None,
                   batch_size: int = 16, progress: bool = True) -> VolumeSegmentation:
    """3-D mask of the structure under the clicked voxel(s) from patch-feature similarity (neural transfer functions).

    Args:
        model: a timm VisionTransformer; slices are fed at the size `patches` sets, so unless that is the model's
            own size it needs `dynamic_img_size=True` (refused with the reason otherwise).
        volume: (D0, D1, D2) array / tensor, or a file nibabel reads (NIfTI, ...) or a `.npy`.
        voxel: one click (z, y, x) of voxel indices, or a list of clicks of the same structure.
        patches: patches along the middle-sized axis (the paper's 64; fewer is faster); the others scale alike.
        layer: block whose features are used; feature: 'k' (the paper's keys), 'q', 'v' or 'x' (see `vk.segment`).
        axes: slicing axes whose feature grids are summed (the paper's "all": 0, 1, 2).
        floor: cosine below it counts 0 (the paper: 0.25 for evaluation, 0.1 interactive); power: exponent 2.5.
        reduce: 'mean' or 'max' over the clicks.
        threshold: mask = similarity >= threshold (0.5: a cosine of at least 0.5^(1/power) = 0.76 at power 2.5).
        mean, std: slice normalisation (default the model's data config, as `vk.data.transform`).
        progress: a progress bar over the slices (stderr).
    """
    check_feature(feature)
    vol = torch.from_numpy(load_volume(volume))
    clicks = _voxels(voxel, vol.shape)
    for name, value in (("patches", patches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"segment_volume: `{name}` must be a positive int, got {value!r}")
    if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"segment_volume: `axes` must be distinct axes among 0, 1, 2, got {tuple(axes)!r}")
    if not 0 <= floor < 1:
        raise ValueError(f"segment_volume: `floor` must be in [0, 1), got {floor}")
    if power <= 0:
        raise ValueError(f"segment_volume: `power` must be > 0, got {power}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"segment_volume: `reduce` must be 'mean' or 'max', got {reduce!r}")
    if not 0 <= float(threshold) <= 1:  # also NaN: the mask would be empty
        raise ValueError(f"segment_volume: `threshold` must be in [0, 1] (the similarity's range), got {threshold}")
    vol = algo.normalise(vol)
    was_training = model.training
    model.eval()
    try:
        feats = volume_features(model, vol, patches, layer, feature, axes, mean, std, batch_size, progress)
    finally:
        model.train(was_training)
    grid = algo.click_similarity(feats, clicks, vol.shape, floor, power, reduce)
    sim = algo.upsample(grid, vol.shape).clamp(0, 1).numpy()
    return VolumeSegmentation(sim >= threshold, sim, grid.numpy(), float(threshold), clicks, vol.numpy())


__all__ = ["segment_volume", "VolumeSegmentation", "load_volume", "volume_features"]
