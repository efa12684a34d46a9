"""TinyViT's sparse teacher-logit cache: run the teacher once, train students from disk with no teacher forward.

*TinyViT: Fast Pretraining Distillation for Small Vision Transformers* (Wu et al., ECCV 2022, arXiv:2207.10666).
Spec: `shared/methods/distill.md` C2.

Claim: distillation nearly as cheap as plain training: the teacher's top-K probabilities and the augmentation seed
of every (sample, epoch) are stored once; training replays the exact augmented view from the seed and reads its
target from disk. The benchmark measures the throughput of cached vs online KD on the same student (≥ 2×).

Algorithm. *Write* (`write_cache`, once per cache, resumable): per epoch and sample, a seed in `[0, 2³¹)`; the data
transform runs with torch, `random` and numpy seeded from it; teacher → softmax → top-K (descending); record
`int32 seed | int16 idx[K] | float16 val[K]`. *Read* (`CachedViews`): re-seed, rebuild the identical view, attach
the record. *Loss*: soft-target CE (T = 1) against the dense target rebuilt from top-K: the stored values at their
indices, `(1 − Σ top-K)/(C − K)` elsewhere. Ground-truth labels are not used by the loss (only for accuracy).

Plugs in at: data and loss only (`prepare_data` + the loss); any timm student. The cache is refused with a message
when corrupt, truncated, incomplete, or written for another teacher (weights digest), transform (its repr), K,
dataset size, shard size or view seed; a half-written cache is completed (resumed) by the next run with the
teacher; every file is written atomically. Format: `logit_cache_io.py` and `docs/distill.md`.

Hand-written here, and why: no maintained library stores teacher logits with replayable augmentation seeds
(torchdistill and timm run the teacher online). Differs from the reference: mixup/cutmix are not supported in
cache mode (the spec's v1: replay needs identical batch composition); one record file per shard of samples
(not per rank; ranks share the (epoch, shard) pairs), so any number of processes can write and read it; the seeds are drawn from (view_seed, epoch,
shard), so a rewritten shard stores the same seeds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import logit_cache_io as io
from . import losses
from .base import DistillLoss, Step, Teacher, register

_log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Config:
    cache_dir: str = field(default="logit-cache", metadata={"help": "cache folder (shared by every student "
                                                                    "trained from it; written when missing)"})
    topk: int = field(default=10, metadata={"help": "K teacher probabilities kept per view (TinyViT: 100 for "
                                                    "IN-22k; 10 implied for IN-1k)"})
    view_seed: int = field(default=0, metadata={"help": "seed of the per-(sample, epoch) augmentation seeds"})
    shard_size: int = field(default=4096, metadata={"help": "samples per shard file (the unit of checksums and "
                                                            "of resuming a half-written cache)"})

    def __post_init__(self):
        if self.topk < 1:
            raise ValueError(f"logit-cache: `topk` must be >= 1, got {self.topk}")
        if self.shard_size < 1:
            raise ValueError(f"logit-cache: `shard_size` must be >= 1, got {self.shard_size}")
        if not self.cache_dir:
            raise ValueError("logit-cache: `cache_dir` must name a folder")


def teacher_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the teacher's class and every tensor of its state dict."""
    h = hashlib.sha256(type(model).__name__.encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def transform_fingerprint(transform) -> str:
    """SHA-256 (first 16 hex digits) of the transform's repr, memory addresses removed."""
    return hashlib.sha256(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)).encode()).hexdigest()[:16]


def sample_keys(data) -> list[str]:
    """One key per sample: the file path under the folder root for image folders, else the index."""
    from vitkit.data import ImageFolder, Subset

    if isinstance(data, Subset):
        inner = sample_keys(data.dataset)
        return [inner[i] for i in data.indices]
    if isinstance(data, ImageFolder):
        return [str(p.relative_to(data.root)).replace("\n", " ") for p in data.files]
    return [str(i) for i in range(len(data))]


def replay(data, index: int, seed: int) -> torch.Tensor:
    """The augmented view of sample `index` drawn with `seed` (bit-identical for the same seed)."""
    with io.seeded(int(seed)):
        return data.transform(data.raw(index))


class CachedViews(torch.utils.data.Dataset):
    """`data` replayed from a cache: item `i` of epoch `e` is `(view, target)` with `target` the float row
    `[label, idx_1..idx_K, val_1..val_K]`; `fit` calls `set_epoch(e)`, which loads and verifies that epoch."""

    def __init__(self, data, root: Path, k: int, epochs: int):
        self.data, self.root, self.k, self.epochs = data, root, k, epochs
        self.keys = sample_keys(data)
        self.shard_size = json.loads((root / io.HEADER).read_text())["shard_size"]
        self.records: Optional[np.ndarray] = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if epoch >= self.epochs:
            raise io.CacheError(f"logit cache {self.root}: epoch {epoch + 1} asked for, the cache was prepared for "
                                f"{self.epochs}")
        n, s = len(self.data), self.shard_size
        self.records = np.concatenate([io.read_shard(self.root, epoch, j, self.k, self.keys[j * s:(j + 1) * s])
                                       for j in range(math.ceil(n / s))])

    def __getitem__(self, index: int):
        rec = self.records[index]
        view = replay(self.data, index, rec["seed"])
        target = np.concatenate([[self.data.targets[index]], rec["idx"], rec["val"]]).astype(np.float32)
        return view, torch.from_numpy(target)


def write_cache(root: Path, data, teacher: Teacher, *, epochs: int, k: int, view_seed: int, shard_size: int,
                batch_size: int, progress: bool = True) -> None:
    """Write the missing shards of epochs `[0, epochs)`; with several processes, the i-th (epoch, shard) pair is
    written by rank `i % world`."""
    from accelerate import PartialState
    from rich.progress import Progress

    state = PartialState()
    n, keys = len(data), sample_keys(data)
    pairs = [(e, j) for e in range(epochs) for j in range(math.ceil(n / shard_size))]
    todo = [(e, j) for i, (e, j) in enumerate(pairs)
            if i % state.num_processes == state.process_index and not io.shard_complete(root, e, j)]
    with Progress(disable=not (progress and state.is_main_process and todo)) as bar:
        task = bar.add_task("writing logit cache", total=len(todo))
        for epoch, j in todo:
            first, count = j * shard_size, min(shard_size, n - j * shard_size)
            seeds = io.shard_seeds(view_seed, epoch, j, count)
            idx, val = [], []
            for b in range(0, count, batch_size):
                views = torch.stack([replay(data, first + i, seeds[i]) for i in range(b, min(b + batch_size, count))])
                probs = teacher(views).float().softmax(-1)
                top = probs.topk(k, dim=-1)  # sorted, descending
                idx.append(top.indices.cpu().numpy()), val.append(top.values.cpu().numpy())
            io.write_shard(root, epoch, j, first, io.encode(seeds, np.concatenate(idx), np.concatenate(val)),
                           keys[first:first + count])
            bar.advance(task)
    state.wait_for_everyone()


class LogitCacheLoss(DistillLoss):
    """Soft-target CE against the dense target rebuilt from the cached top-K; no teacher forward."""

    needs_teacher = False

    def __init__(self, cfg: Config, teacher: Optional[Teacher], student: nn.Module, example: torch.Tensor):
        super().__init__(cfg, teacher, student, example)
        self.num_classes: Optional[int] = None

    def prepare_data(self, data, teacher, *, epochs, seed, batch_size, progress=True):
        cfg = self.cfg
        if not (hasattr(data, "raw") and getattr(data, "transform", None) is not None and hasattr(data, "targets")):
            raise TypeError("logit-cache: the data must be a vitkit dataset with its transform attached "
                            "(data.with_transform(vk.data.transform(student, train=True))): views are replayed "
                            "from raw images")
        root = Path(cfg.cache_dir)
        wanted = {"k": cfg.topk, "transform": transform_fingerprint(data.transform), "samples": len(data),
                  "shard_size": cfg.shard_size, "view_seed": cfg.view_seed,
                  "teacher": teacher_digest(teacher.model) if teacher is not None else None}
        header = io.check_header(root, wanted)
        if teacher is not None:
            with torch.no_grad():
                classes = teacher(torch.stack([data[0][0]])).shape[-1]
            if cfg.topk > classes:
                raise ValueError(f"logit-cache: `topk` {cfg.topk} exceeds the teacher's {classes} classes")
            if classes > 32768:
                raise ValueError(f"logit-cache: {classes} classes do not fit the int16 indices (at most 32,768)")
            if header is None:
                from vitkit.io import atomic_write

                header = {"format": io.FORMAT, "version": io.VERSION, **wanted, "num_classes": classes,
                          "record_bytes": io.record_dtype(cfg.topk).itemsize}
                from accelerate import PartialState

                if PartialState().is_main_process:
                    atomic_write(root / io.HEADER, lambda tmp: Path(tmp).write_text(json.dumps(header, indent=1)))
                PartialState().wait_for_everyone()
            write_cache(root, data, teacher, epochs=epochs, k=cfg.topk, view_seed=cfg.view_seed,
                        shard_size=cfg.shard_size, batch_size=batch_size, progress=progress)
        elif header is None:
            raise ValueError(f"logit-cache: no cache in {root}; pass the teacher once to write it")
        self.num_classes = header["num_classes"]
        _log.info("logit-cache: %s (teacher %s, K=%d, %d classes): training without teacher forwards", root,
                  header["teacher"], cfg.topk, self.num_classes)
        return CachedViews(data, root, cfg.topk, epochs)

    def forward(self, student, teacher, images, targets) -> Step:
        k = self.cfg.topk
        labels, idx, val = targets[:, 0].long(), targets[:, 1:1 + k].long(), targets[:, 1 + k:]
        logits = student(images)
        target = losses.dense_from_topk(idx, val, self.num_classes)
        return Step(logits, losses.soft_target_ce(logits, target), labels)


register("logit-cache", config=Config, loss=LogitCacheLoss)
