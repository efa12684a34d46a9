"""In-memory samples that are tensors already: clips, multispectral tiles, spectrograms, point clouds, image pairs
(the inputs of the input adapters, docs/applications.md). `vk.data.tensors(x, y)`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .datasets import VisionDataset


class TensorDataset(VisionDataset):
    """Samples `x[i]` (any shape, as given) with labels `y[i]`; an optional `transform` acts on one sample."""

    def __init__(self, samples: torch.Tensor, labels: Sequence[int], classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None):
        labels = torch.as_tensor(labels).long()
        if not isinstance(samples, torch.Tensor) or len(samples) != len(labels):
            raise ValueError(f"tensors: expected a tensor of N samples and N labels, got {type(samples).__name__} "
                             f"of length {len(samples)} and {len(labels)} labels")
        self.samples, self.targets = samples, labels.tolist()
        n = int(labels.max()) + 1 if len(labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]
        self.transform = transform

    def raw(self, index: int) -> torch.Tensor:
        return self.samples[index]

    def __repr__(self) -> str:
        return f"TensorDataset({len(self)} samples {tuple(self.samples.shape[1:])}, {len(self.classes)} classes)"


def tensors(samples: torch.Tensor, labels: Sequence[int], classes: Optional[Sequence[str]] = None,
            transform: Optional[Callable] = None) -> TensorDataset:
    """A dataset of tensor samples (`vk.fit`, `vk.evaluate`, `vk.pretrain` take it like an image dataset)."""
    return TensorDataset(samples, labels, classes, transform)
