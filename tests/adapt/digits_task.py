"""The digits task for the PEFT learning tests: the embedded pretrained ViT adapted to sklearn's digits.

sklearn `load_digits` (1,797 grey 8x8 images, offline), shuffled with a fixed seed, upsampled to 32x32 (bilinear),
3 channels, mean = std = 0.5; 1,000 training and 500 held-out images. Training is `vk.fit` (AdamW, cosine, no
warmup, batch 50, each method's own lr and weight decay unless given); accuracy is top-1 on the held-out images.
"""
from __future__ import annotations

import torch

import vitkit as vk
from vitkit.data.datasets import digits_tensors as digits_split  # noqa: F401  (the task's data, shared with benchmarks)


def pretrained(seed: int = 0):
    """vitkit's embedded CIFAR-10 ViT with a fresh, seeded 10-class head."""
    model = vk.load("vitkit/vit-tiny-cifar")
    torch.manual_seed(seed)
    model.reset_classifier(10)
    return model


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    x, y = dataset.tensors
    return (model(x).argmax(-1) == y).float().mean().item()


def train(model, train_set, test_set, *, epochs: int, out_dir, lr: float | None = None,
          weight_decay: float | None = None, seed: int = 0) -> float:
    """`vk.fit` for `epochs`, then held-out accuracy; lr / weight decay None: the method's own (its Config)."""
    vk.fit(model, train_set, epochs=epochs, lr=lr, batch_size=50, warmup_epochs=0, weight_decay=weight_decay,
           seed=seed, out_dir=out_dir, progress=False, save_model=False)
    return accuracy(model, test_set)
