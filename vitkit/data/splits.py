"""Deterministic, stratified, seeded splits.

Each class is split on its own, so every part keeps the class balance. The shuffle uses numpy's PCG64
generator (`numpy.random.default_rng(seed)`), whose stream is specified and identical on every platform, so
the same seed gives the same split on any machine. `seed=None` keeps the dataset order (for documented splits
such as "the first 800 images of each class train, the last 200 evaluate").
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .datasets import Subset, VisionDataset


def _by_class(targets: list[int], seed: Optional[int]) -> dict[int, list[int]]:
    rng = None if seed is None else np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        groups.setdefault(int(label), []).append(index)
    if rng is not None:
        for label in sorted(groups):
            groups[label] = [groups[label][i] for i in rng.permutation(len(groups[label]))]
    return groups


def split(dataset: VisionDataset, seed: Optional[int] = 0, **parts: float | int) -> dict[str, Subset]:
    """Split `dataset` per class into named parts.

    Each part is a fraction of every class (float, e.g. `train=0.8, test=0.2`) or a number of images per class
    (int, e.g. `train=800, test=200`). Parts are taken in the order given; the remainder is dropped. With
    fractions, the last part takes the rounding remainder when the fractions sum to 1.

    Example:
        parts = vk.data.split(ds, seed=0, train=0.7, val=0.1, test=0.2)
        parts = vk.data.split(cifar, seed=None, train=800, test=200)   # first 800 / last 200 per class
    """
    if not parts:
        raise ValueError("split: name at least one part, e.g. split(ds, train=0.8, test=0.2)")
    fractions = [v for v in parts.values() if isinstance(v, float)]
    if fractions and len(fractions) != len(parts):
        raise ValueError(f"split: give every part as a fraction (float) or every part as a count (int), got {parts}")
    if fractions and (min(fractions) < 0 or sum(fractions) > 1 + 1e-9):
        raise ValueError(f"split: fractions must be >= 0 and sum to at most 1, got {parts}")
    out: dict[str, list[int]] = {name: [] for name in parts}
    for label, indices in sorted(_by_class(dataset.targets, seed).items()):
        n = len(indices)
        if fractions:
            counts = [int(round(v * n)) for v in parts.values()]
            if abs(sum(fractions) - 1) < 1e-9:
                counts[-1] = n - sum(counts[:-1])
        else:
            counts = [int(v) for v in parts.values()]
            if sum(counts) > n:
                raise ValueError(f"split: class {dataset.classes[label]!r} has {n} images, fewer than the "
                                 f"{sum(counts)} asked for ({parts})")
        start = 0
        for name, count in zip(parts, counts):
            out[name].extend(indices[start:start + count])
            start += count
    return {name: Subset(dataset, sorted(idx)) for name, idx in out.items()}


def few_shot(dataset: VisionDataset, n: int, seed: int = 0) -> Subset:
    """`n` images per class, drawn with `seed` (the support set of an n-shot task)."""
    return split(dataset, seed=seed, shot=int(n))["shot"]
