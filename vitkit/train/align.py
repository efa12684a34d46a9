"""Align a new sensor's encoder to a frozen ViT's embeddings with InfoNCE: `vk.align(encoder, model, pairs)`.

OmniVTLA (2025) trains a tactile encoder contrastively against frozen vision features (as ViPFormer and Any2Point
do for points): the new modality inherits the image model's semantics, so tactile→image retrieval and zero-shot
classification through image prototypes beat a random encoder. Spec: `../shared/methods/applications.md`
entry 8 and §2 ("sensor alignment").

    result = vk.align(tactile_encoder, vit, pairs, val=val_pairs, epochs=10)   # pairs: (sensor, image[, label])
    result.metrics          # {"recall@1": ..., "recall@5": ..., "prototype_top1": ...} on val_pairs
    emb = result.aligner.embed(sensor_batch)                                     # unit vectors in the ViT's space

The ViT embeds each image once (`forward_head(pre_logits=True)`, frozen); the encoder (plus a linear projection
when its width differs) trains through `vk.fit` — progress, resume, Accelerate — on the symmetric InfoNCE loss
with temperature τ: L = ½[CE(q kᵀ/τ, I) + CE(k qᵀ/τ, I)] over a batch of normalised sensor embeddings q and image
embeddings k. The training accuracy `vk.fit` prints is the in-batch sensor→image top-1.

Hand-written: InfoNCE is a few lines of torch; the libraries that ship it (lightly's NTXentLoss) contrast two
trainable views of one modality, not a trainable encoder against fixed targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07,
             symmetric: bool = True) -> torch.Tensor:
    """InfoNCE of row i of `query` against row i of `keys` (the others in the batch are the negatives)."""
    q, k = F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    labels = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits, labels)
    return (loss + F.cross_entropy(logits.T, labels)) / 2 if symmetric else loss


def recall_at_k(query: torch.Tensor, keys: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Cross-modal Recall@K: the share of queries whose own key (same row) is among their K most similar keys."""
    sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(1)  # keys strictly more similar than the query's own key
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


def prototype_accuracy(query: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                       key_labels: torch.Tensor) -> float:
    """Zero-shot top-1: each query takes the class of the nearest class prototype (mean normalised key)."""
    keys = F.normalize(keys, dim=-1)
    classes = key_labels.unique()
    protos = F.normalize(torch.stack([keys[key_labels == c].mean(0) for c in classes]), dim=-1)
    pred = classes[(F.normalize(query, dim=-1) @ protos.T).argmax(1)]
    return float((pred == labels).float().mean())


class Aligner(nn.Module):
    """The trainable side: `encoder` (+ a linear projection to the ViT's width when needed); computes its loss."""

    computes_loss = True  # vk.fit calls model(sensor, image_embedding) -> (logits, loss, labels)

    def __init__(self, encoder: nn.Module, in_dim: int, dim: int, temperature: float, symmetric: bool):
        super().__init__()
        self.encoder = encoder
        self.project = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.temperature, self.symmetric = temperature, symmetric

    def embed(self, sensor: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.encoder(sensor)), dim=-1)

    def forward(self, sensor: torch.Tensor, target: torch.Tensor):
        q = self.embed(sensor)
        logits = q @ F.normalize(target, dim=-1).T / self.temperature
        labels = torch.arange(len(q), device=q.device)
        return logits, info_nce(q, target, self.temperature, self.symmetric), labels


@dataclass
class AlignResult:
    aligner: Aligner
    metrics: dict = field(default_factory=dict)  # on `val`: recall@k (sensor -> image), prototype_top1
    fit: Optional[object] = None  # vk.fit's FitResult


class _Pairs(torch.utils.data.Dataset):
    """(sensor, target) items: the sensor input and the frozen ViT's embedding of its paired image."""

    def __init__(self, sensors: list, targets: torch.Tensor):
        self.sensors, self.targets = sensors, targets

    def __len__(self) -> int:
        return len(self.sensors)

    def __getitem__(self, i):
        return self.sensors[i], self.targets[i]


def _split_pairs(pairs, what: str) -> tuple[list, torch.Tensor, Optional[torch.Tensor]]:
    sensors, images, labels = [], [], []
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"vk.align: `{what}` must yield (sensor, image) or (sensor, image, label) items, got "
                             f"{type(item).__name__}")
        sensors.append(torch.as_tensor(item[0]))
        images.append(torch.as_tensor(item[1]))
        if len(item) == 3:
            labels.append(int(item[2]))
    if not sensors:
        raise ValueError(f"vk.align: `{what}` is empty")
    return sensors, torch.stack(images), torch.tensor(labels) if len(labels) == len(sensors) else None


def _image_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's pooled pre-logits of `images` (`vk.evaluate`'s features), as ordinary tensors (not
    inference-mode ones, which training may not save for backward)."""
    from .evaluate import features

    labels = torch.zeros(len(images), dtype=torch.long)
    return features(model, torch.utils.data.TensorDataset(images, labels))[0].clone()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def embed_sensors(aligner: "Aligner", sensors: list, batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit embeddings of `sensors`, computed in batches on the aligner's device (where `vk.fit` left it:
    the GPU when there is one), returned there."""
    device = _device(aligner)
    return torch.cat([aligner.embed(torch.stack(sensors[i:i + batch_size]).to(device))
                      for i in range(0, len(sensors), batch_size)])


def align(encoder: nn.Module, model: nn.Module, pairs, *, val=None, epochs: int = 10, lr: float = 1e-3,
          batch_size: int = 64, temperature: float = 0.07, symmetric: bool = True, seed: int = 0,
          out_dir: str | Path = "runs/align", **fit_kwargs) -> AlignResult:
    """Train `encoder` so that its embedding of each sensor input matches the frozen `model`'s image embedding.

    Args:
        encoder: any module mapping a batch of sensor inputs to vectors (B, D'); trained (with a projection to the
            ViT's width D when D' != D).
        model: the frozen ViT (timm-style `forward_features` / `forward_head`); its weights are not changed.
        pairs, val: datasets (or lists) of (sensor, image) or (sensor, image, label), images prepared for `model`.
            `val` gives `metrics`: sensor→image recall@1/5 and, with labels, zero-shot top-1 through image class
            prototypes (from `pairs`' images when they are labelled, else `val`'s).
        temperature, symmetric: InfoNCE temperature; both directions (sensor→image and image→sensor) or one.
        **fit_kwargs: further `vk.fit` settings (`resume`, `progress`, `warmup_epochs`, ...).
    """
    if not temperature > 0:
        raise ValueError(f"vk.align: `temperature` must be > 0, got {temperature!r}")
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"vk.align: `model` must be a timm-style model (forward_features / forward_head), got "
                        f"{type(model).__name__}")
    from .fit import fit

    sensors, images, labels = _split_pairs(pairs, "pairs")
    targets = _image_embeddings(model, images)
    with torch.no_grad():
        was_training = encoder.training
        encoder.eval()
        out = encoder(sensors[0][None].to(_device(encoder)))
        encoder.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"vk.align: the encoder must return (batch, features); it returned shape {tuple(out.shape)}")
    torch.manual_seed(seed)
    aligner = Aligner(encoder, out.shape[1], targets.shape[1], temperature, symmetric)
    result = fit(aligner, _Pairs(sensors, targets), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                 out_dir=out_dir, save_model=False, label_smoothing=0.0, **fit_kwargs)
    metrics = {}
    if val is not None:
        v_sensors, v_images, v_labels = _split_pairs(val, "val")
        v_targets = _image_embeddings(model, v_images)
        aligner.eval()
        q = embed_sensors(aligner, v_sensors).float().cpu()  # the targets are on the CPU (`features`)
        metrics = recall_at_k(q, v_targets)
        if v_labels is not None:
            keys, key_labels = (targets, labels) if labels is not None else (v_targets, v_labels)
            metrics["prototype_top1"] = prototype_accuracy(q, v_labels, keys, key_labels)
    return AlignResult(aligner=aligner, metrics=metrics, fit=result)
