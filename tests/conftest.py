"""Shared fixtures: the conformance variants (tiny random-init timm ViTs) and real offline data paths."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, not spin
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: split the cores between the workers (and their subprocesses)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from pathlib import Path  # noqa: E402

import pytest
import torch

import vitkit as vk

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_JPEG = SHARED / "data" / "cifar10-test-jpeg" / "test"
SHAMAIL = SHARED / "weights" / "shamail-123_VisionTriad-CIFAR10" / "model" / "best_vit.pth"
SMMK47 = SHARED / "weights" / "smmk47_CIFAR10-Classification" / "vit_cifar10.pth"

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10)
# The conformance table (DESIGN §5): every registered method runs on each of these.
VARIANTS = {
    "plain": {},
    "registers": dict(reg_tokens=4),
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
    "layerscale": dict(init_values=1e-5),
    "qk_norm": dict(qk_norm=True),
    "reg_no_cls": dict(reg_tokens=4, class_token=False, no_embed_class=True, global_pool="avg"),
}


def make_variant(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random-init ViT of variant `name`, built through vk.load so it carries a base reference."""
    torch.manual_seed(seed)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, **{**TINY, **VARIANTS[name], **extra})
    if name == "layerscale":  # make LayerScale matter: 1e-5 would hide a dropped ls1/ls2
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.uniform_(0.5, 1.5)
                block.ls2.gamma.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    """(name, model) for each conformance variant."""
    return request.param, make_variant(request.param)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"offline data not found: {path}")
    return path


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n auto`), the long tests (marked slow: most docs blocks that train) start first, so that
    no worker is left running one of them alone at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker collects (the same order); the controller deals them out
        def order(item):  # slow first, the longest (`slow(seconds=...)`: the docs' "about N s") first among them
            slow = item.get_closest_marker("slow")
            return slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0)

        items.sort(key=order)  # stable: otherwise collection order
