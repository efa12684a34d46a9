"""vitkit: adapt, accelerate, compress, explain and benchmark pretrained Vision Transformers (timm).

    import vitkit as vk
    model = vk.load("vit_small_patch16_224.augreg_in21k", num_classes=10)
    vk.adapt(model, "linear")
    print(vk.info(model))
"""
from __future__ import annotations

import os as _os

# OpenMP threads that spin while waiting make PyTorch many times slower on a shared or busy CPU (measured:
# 4.9 s -> 0.06 s for one training step of a tiny ViT on 2 cores). Effective only when vitkit is imported
# before torch (the CLI and the tests do); set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .info import Info, info
from .io import save
from .models import TokenLayout, get_runner, load, token_layout
from .registry import Method, applied, methods
from . import data  # vk.data: datasets, transforms, splits
from .train import evaluate, fit
from . import assets as _assets  # registers embedded checkpoints
from .explain import attention, explain, segment, similarity_overlap  # vk.explain & co.
from .bench import bench  # vk.bench: backbones x methods x protocols


def apply(model, name: str, **config):
    """Apply any registered method `name` with `config` (see `vk.methods()`); returns the same model."""
    from .registry import apply as _apply

    return _apply(model, name, **config)


def adapt(model, name: str, **config):
    """Apply a parameter-efficient adaptation method (kind `adapt`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="adapt", **config)


def accelerate(model, name: str, **config):
    """Apply a token-reduction method (kind `accelerate`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="accelerate", **config)


def compress(model, name: str, **config):
    """Apply a compression method (kind `compress`)."""
    from .registry import apply as _apply

    return _apply(model, name, kind="compress", **config)


__all__ = ["__version__", "load", "save", "info", "Info", "methods", "Method", "applied", "apply", "adapt",
           "accelerate", "compress", "token_layout", "TokenLayout", "get_runner", "data", "fit", "evaluate",
           "attention", "explain", "segment", "similarity_overlap", "bench"]
