"""Procedural tasks for the input adapters (docs/applications.md): sounds, multispectral tiles, clips, image pairs,
point clouds, generated with exact labels because no such data ships offline. `vk.data.procedural(name)`.

Each task is made for the question its adapter answers, so that the new input carries what an RGB image cannot:

* `sounds`: 8 sound events (tone, up/down chirp, AM tone, harmonic stack, noise burst, click train, two tones; random
  pitch, onset, length, level, noise), 0.5 s at 8 kHz -> log-mel (1, 32, 64), standardised; adapter `spectrogram`.
* `tiles`: (10, 32, 32) Sentinel-2 tiles (`channels.SENTINEL2` band order) of Voronoi land cover of 4 classes with
  *the same* RGB statistics, told apart only by NIR / red-edge / SWIR; the label is the majority cover (`tile_maps`
  gives the per-patch labels of the dense task; `tile_scenes` adds roads and buildings with per-patch density
  targets); adapter `channels`.
* `clips`: (3, 4, 32, 32) clips of a 16x16 digit moving 3 px/frame in one of 8 directions; adapter `video`.
* `pairs`: (6, 32, 32) image pairs, a digit then the same digit moved 4 px left/right/up/down (4 classes, which no
  single image shows); adapter `paired`.
* `points`: (256, 3) clouds of 8 primitives under random rotation, scale and jitter; adapter `points`.

`view(name, x)` is what an RGB image model can take of a sample (the spectrogram replicated to 3 channels, bands
B04 B03 B02, the frame average, the first image; point clouds have none): the baseline `vitkit bench` runs a task's
RGB backbone on. Hand-written: these are this project's test tasks, not a dataset a library ships.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .tensors import TensorDataset

SR, DURATION = 8000, 0.5  # sounds: sample rate (Hz), length (s)
RGB_MEAN = [0.3, 0.35, 0.3]  # tiles: the mean of B02 B03 B04, equal for every class
REST = [[0.6, 0.4, 0.5, 0.55, 0.6, 0.3, 0.2], [0.3, 0.3, 0.35, 0.3, 0.3, 0.5, 0.4],  # B08 B05 B06 B07 B8A B11 B12
        [0.45, 0.5, 0.4, 0.45, 0.45, 0.2, 0.6], [0.2, 0.45, 0.3, 0.25, 0.2, 0.6, 0.3]]


# ------------------------------------------------------------------------------------------------------- sounds
def sound(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One waveform of sound event `kind` (0-7)."""
    t = np.arange(int(SR * DURATION)) / SR
    f = rng.uniform(300, 2500)
    if kind == 0:  # tone
        s = np.sin(2 * np.pi * f * t)
    elif kind in (1, 2):  # up / down chirp
        f0, f1 = sorted(rng.uniform(200, 3500, 2))
        f0, f1 = (f0, f1) if kind == 1 else (f1, f0)
        s = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * DURATION)))
    elif kind == 3:  # amplitude-modulated tone
        s = (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(8, 20) * t)) * np.sin(2 * np.pi * f * t)
    elif kind == 4:  # harmonic stack
        f0 = rng.uniform(150, 400)
        s = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    elif kind == 5:  # noise burst
        s = rng.standard_normal(len(t))
    elif kind == 6:  # click train
        s = np.zeros(len(t))
        s[(np.arange(0, DURATION, 1 / rng.uniform(10, 40)) * SR).astype(int)] = 8.0
    else:  # two tones
        s = np.sin(2 * np.pi * f * t) + np.sin(2 * np.pi * f * rng.uniform(1.3, 1.9) * t)
    env = np.zeros(len(t))
    start = rng.uniform(0, 0.2)
    env[(t >= start) & (t < start + rng.uniform(0.2, DURATION - start))] = 1.0
    s = s * env * rng.uniform(0.3, 1.0) / (np.abs(s).max() + 1e-9)
    return s + rng.standard_normal(len(t)) * rng.uniform(0.01, 0.1)


def sounds(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(8 * per_class, 1, 32, 64) standardised log-mel spectrograms, labels (class-blocked)."""
    from vitkit.adapt.spectrogram_algo import log_mel

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(8), per_class)
    waves = torch.tensor(np.stack([sound(int(k), rng) for k in labels]), dtype=torch.float32)
    spec = log_mel(waves, SR, n_fft=256, hop=62, n_mels=32)[..., :64]
    return (spec - spec.mean()) / spec.std(), torch.tensor(labels)


# ------------------------------------------------------------------------------------------------------- tiles
def tile_maps(n: int, rng: np.random.Generator, favour: Optional[int] = None):
    """(n, 10, 32, 32) normalised tiles and (n, 8, 8) majority labels of their 4x4 patches. `favour`: a class
    given to each Voronoi cell with probability 0.6 (else uniform), so that it tends to dominate the tile."""
    yy, xx = np.mgrid[0:32, 0:32]
    out, labels = np.zeros((n, 10, 32, 32), np.float32), np.zeros((n, 8, 8), np.int64)
    means = np.array([RGB_MEAN + rest for rest in REST], np.float32)
    for i in range(n):
        seeds = rng.uniform(0, 32, (6, 2))
        cls = rng.integers(0, 4, 6)
        if favour is not None:
            cls = np.where(rng.uniform(size=6) < 0.6, favour, cls)
        cover = cls[((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)]  # Voronoi
        texture = rng.normal(0, 0.08, (32, 32, 1)) + rng.normal(0, 0.05, (32, 32, 10))
        out[i] = ((means[cover] + texture - 0.4) / 0.2).transpose(2, 0, 1)
        labels[i] = np.eye(4)[cover].reshape(8, 4, 8, 4, 4).sum((1, 3)).argmax(-1)
    return torch.tensor(out), torch.tensor(labels)


def tiles(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 * per_class, 10, 32, 32) tiles labelled by their majority land cover (class-blocked): each class's tiles
    are drawn favouring it until `per_class` of them have it as the majority of their 64 patches."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(4):
        kept = []
        while len(kept) < per_class:
            x, y = tile_maps(1, rng, favour=c)
            if torch.bincount(y.flatten(), minlength=4).argmax() == c:
                kept.append(x[0])
        out.append(torch.stack(kept))
    return torch.cat(out), torch.arange(4).repeat_interleave(per_class)


ROAD = [0.7] * 10  # asphalt: bright and flat in every band, so RGB shows it as well as all 10 bands do
ROOF = [0.25, 0.3, 0.65, 0.35, 0.5, 0.45, 0.4, 0.35, 0.55, 0.5]  # red roofs (B04 high), in SENTINEL2 order


def tile_scenes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense task of PhilEO on procedural tiles: `tile_maps`' land cover with roads (1-3 polylines of 2-3
    segments, 1 px wide) and buildings (1-6 rectangles of 2-6 px sides) drawn over it, both visible in RGB.

    Returns:
        (n, 10, 32, 32) normalised tiles, (n, 8, 8) land-cover labels of the 4x4 patches (majority of the cover
        under roads and buildings, as `tile_maps`), (n, 2, 8, 8) road and building density per patch: the fraction
        of its 16 pixels they cover (disjoint: a building hides the road under it).
    """
    from vitkit.adapt.dense_algo import density

    x, cover = tile_maps(n, rng)
    road, roof = np.array(ROAD, np.float32), np.array(ROOF, np.float32)
    masks = np.zeros((n, 2, 32, 32), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            points = rng.uniform(0, 32, (rng.integers(3, 5), 2))
            for a, b in zip(points[:-1], points[1:]):
                t = np.linspace(0, 1, 64)[:, None]
                yx = np.clip(np.floor(a + t * (b - a)), 0, 31).astype(int)
                masks[i, 0, yx[:, 0], yx[:, 1]] = True
        for _ in range(rng.integers(1, 7)):
            h, w = rng.integers(2, 7, 2)
            top, left = rng.integers(0, 33 - h), rng.integers(0, 33 - w)
            masks[i, 1, top:top + h, left:left + w] = True
        masks[i, 0] &= ~masks[i, 1]
        for mask, value in ((masks[i, 0], road), (masks[i, 1], roof)):
            noise = rng.normal(0, 0.05, (int(mask.sum()), 10)).astype(np.float32)
            x[i][:, torch.from_numpy(mask)] = torch.from_numpy(((value + noise - 0.4) / 0.2).T)
    return x, cover, density(torch.from_numpy(masks), 4)


# ------------------------------------------------------------------------------------------------------- digits
def _small_digits() -> torch.Tensor:
    """scikit-learn's 1,797 digits, 16x16 in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    return F.interpolate(digits, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]


def clips(per_class: int, seed: int = 0, frames: int = 4, speed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(8 * per_class, 3, frames, 32, 32) clips of a 16x16 digit moving `speed` px/frame in one of 8 directions."""
    rng = np.random.default_rng(seed)
    digits = _small_digits()
    dirs = [(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4]
    labels = np.repeat(np.arange(8), per_class)
    out = torch.zeros(len(labels), frames, 32, 32)
    span = speed * (frames - 1)
    for i, c in enumerate(labels):
        d = digits[rng.integers(len(digits))]
        dx, dy = dirs[c]
        x0 = rng.uniform(max(0, -dx * span), 16 - max(0, dx * span))
        y0 = rng.uniform(max(0, -dy * span), 16 - max(0, dy * span))
        for f in range(frames):
            x, y = int(round(x0 + dx * speed * f)), int(round(y0 + dy * speed * f))
            out[i, f, y:y + 16, x:x + 16] = d
    out = (out - 0.5) / 0.5
    return out[:, None].expand(-1, 3, -1, -1, -1).contiguous(), torch.tensor(labels)


def pairs(per_class: int, seed: int = 0, shift: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 * per_class, 6, 32, 32) image pairs: a 16x16 digit, then the same digit moved `shift` px left / right /
    up / down (the label)."""
    rng = np.random.default_rng(seed)
    digits = _small_digits()
    moves = [(-shift, 0), (shift, 0), (0, -shift), (0, shift)]
    labels = np.repeat(np.arange(4), per_class)
    out = torch.zeros(len(labels), 2, 32, 32)
    for i, c in enumerate(labels):
        d = digits[rng.integers(len(digits))]
        x0, y0 = (int(v) for v in rng.integers(shift, 16 - shift + 1, size=2))
        dx, dy = moves[c]
        out[i, 0, y0:y0 + 16, x0:x0 + 16] = d
        out[i, 1, y0 + dy:y0 + dy + 16, x0 + dx:x0 + dx + 16] = d
    out = (out - 0.5) / 0.5
    return out[:, :, None].expand(-1, -1, 3, -1, -1).reshape(len(labels), 6, 32, 32).contiguous(), torch.tensor(labels)


# ------------------------------------------------------------------------------------------------------ points
def primitive(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points of primitive `kind` (0-7), randomly rotated, scaled and jittered."""
    u, v = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    a = 2 * np.pi * u
    if kind == 0:  # sphere
        p = rng.standard_normal((n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif kind == 1:  # cube surface
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1, 1], n)
    elif kind == 2:  # cylinder
        p = np.stack([np.cos(a), np.sin(a), 2 * v - 1], 1)
    elif kind == 3:  # cone
        p = np.stack([(1 - v) * np.cos(a), (1 - v) * np.sin(a), 2 * v - 1], 1)
    elif kind == 4:  # torus
        b = 2 * np.pi * v
        p = np.stack([(1 + 0.35 * np.cos(b)) * np.cos(a), (1 + 0.35 * np.cos(b)) * np.sin(a), 0.35 * np.sin(b)], 1)
    elif kind == 5:  # square plane
        p = np.stack([2 * u - 1, 2 * v - 1, np.zeros(n)], 1)
    elif kind == 6:  # two parallel discs
        r = np.sqrt(v)
        p = np.stack([r * np.cos(a), r * np.sin(a), rng.choice([-0.5, 0.5], n)], 1)
    else:  # cross of three sticks
        p = np.zeros((n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = 2 * u - 1
        p += rng.normal(0, 0.05, (n, 3))
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # a random rotation (or reflection)
    return (p * rng.uniform(0.8, 1.2, 3)) @ q.T + rng.normal(0, 0.01, (n, 3))


def points(per_class: int, seed: int = 0, n_points: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(8 * per_class, n_points, 3) point clouds of 8 primitives."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(8), per_class)
    return (torch.tensor(np.stack([primitive(int(k), n_points, rng) for k in labels]), dtype=torch.float32),
            torch.tensor(labels))


# ------------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """A procedural task: its generator, the input adapter that takes its samples, what the samples are, and
    the RGB view of one sample (None: an image model can take nothing of it)."""

    make: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    adapter: str
    input: str
    view: Optional[Callable[[torch.Tensor], torch.Tensor]]
    view_text: str
    spatial: bool = True  # the last two dimensions are image rows and columns (resized to the model's size)


def grey_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(1, H, W) -> (3, H, W), the channel replicated."""
    return x.expand(3, -1, -1)


def rgb_bands(x: torch.Tensor) -> torch.Tensor:
    """(10, H, W) Sentinel-2 tile -> (3, H, W) B04 B03 B02 (red, green, blue)."""
    from vitkit.adapt.channels import SENTINEL2

    return x[[SENTINEL2.index(b) for b in ("B04", "B03", "B02")]]


def frame_average(x: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) -> (C, H, W)."""
    return x.mean(1)


def first_image(x: torch.Tensor) -> torch.Tensor:
    """(6, H, W) pair -> (3, H, W), the first image."""
    return x[:3]


TASKS = {
    "sounds": Task(sounds, "spectrogram", "log-mel spectrograms (1, 32, 64)", grey_to_rgb,
                   "the spectrogram replicated to 3 channels"),
    "tiles": Task(tiles, "channels", "Sentinel-2 tiles (10, 32, 32)", rgb_bands, "bands B04 B03 B02"),
    "clips": Task(clips, "video", "clips (3, 4, 32, 32)", frame_average, "the frame average"),
    "pairs": Task(pairs, "paired", "image pairs (6, 32, 32)", first_image, "the first image"),
    "points": Task(points, "points", "point clouds (256, 3)", None,
                   "nothing (a point cloud has no RGB view: no baseline row)", spatial=False),
}


@functools.lru_cache(maxsize=8)
def _generate(name: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in TASKS:
        raise ValueError(f"unknown procedural task `{name}`; valid: {sorted(TASKS)}")
    if per_class < 1:
        raise ValueError(f"procedural task `{name}`: `per_class` must be >= 1, got {per_class}")
    return TASKS[name].make(per_class, seed)


def procedural(name: str, per_class: int = 40, seed: int = 0) -> TensorDataset:
    """The procedural task `name` (see `TASKS`) with `per_class` samples of each class, in class order."""
    x, y = _generate(name, per_class, seed)
    return TensorDataset(x.clone(), y)  # a copy: editing it in place must not change the cached samples (`digest`)


@functools.lru_cache(maxsize=8)  # `Cell.key` asks for it on every lookup of a cell
def digest(name: str, per_class: int, seed: int = 0) -> str:
    """SHA-256 (16 hex digits) of the samples and labels: keys `vitkit bench` cells on the data, not the code."""
    h = hashlib.sha256()
    for t in _generate(name, per_class, seed):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
