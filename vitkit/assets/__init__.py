"""Checkpoints shipped inside the package, loadable offline by name: `vk.load("vitkit/vit-tiny-cifar")`.

Each entry records the file, the architecture arguments the tensors do not reveal, and the data config it was
trained with (`vitkit.data.transform` reads it). How each was made: docs/embedded-model.md.
"""
from __future__ import annotations

from pathlib import Path

from vitkit.models.loading import EMBEDDED

HERE = Path(__file__).resolve().parent

EMBEDDED["vitkit/vit-tiny-cifar"] = {
    "file": HERE / "vit_tiny_cifar.safetensors",
    # ViT, 32 px, patch 4, width 128, depth 6, 4 heads, MLP ratio 2, class token: 0.81 M parameters.
    "model_args": {"num_heads": 4},
    "data_config": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "interpolation": "bicubic"},
    "trained_on": "CIFAR-10 test JPEGs, first 800 images per class (folder order); last 200 per class held out",
}
