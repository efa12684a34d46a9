"""The digits task for the PEFT learning tests: the embedded pretrained ViT adapted to sklearn's digits.

sklearn `load_digits` (1,797 grey 8x8 images, offline), shuffled with a fixed seed, upsampled to 32x32 (bilinear),
3 channels, mean = std = 0.5; 1,000 training and 500 held-out images. Training is `vk.fit` (AdamW, cosine, no
warmup, batch 50, each method's own lr and weight decay unless given); accuracy is top-1 on the held-out images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vitkit as vk


def digits_split(n_train: int = 1000, n_test: int = 500, seed: int = 0):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return torch.utils.data.TensorDataset(x[tr], y[tr]), torch.utils.data.TensorDataset(x[te], y[te])


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
