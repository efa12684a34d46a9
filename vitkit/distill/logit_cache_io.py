"""The logit cache on disk (TinyViT's sparse teacher logits): record codec, header, shards, seeded replay.

Layout of a cache folder (byte-level format in `docs/distill.md`):

    header.json                       {"format": "vitkit-logit-cache", "version": 1, "k", "num_classes",
                                       "teacher", "transform", "samples", "shard_size", "view_seed",
                                       "record_bytes"}
    epoch_0000/shard_00000.bin        `count` fixed-size records, little-endian, no padding:
                                          int32 seed | int16 idx[K] | float16 val[K]      (4K + 4 bytes)
    epoch_0000/shard_00000.keys       one sample key per line (UTF-8), in record order
    epoch_0000/shard_00000.json       {"first", "count", "sha256" (of .bin), "keys_sha256"}: written last,
                                      so a shard without it is incomplete (rewritten on resume)

Shard `s` of an epoch holds samples `[s·shard_size, (s+1)·shard_size)` in dataset order. Every file is written
to a temporary name and renamed (atomic). Reading checks, per shard: the commit file, the .bin size
(`count·(4K+4)`: truncation), the SHA-256 of .bin and .keys (corruption) and the keys (same samples).
torch / numpy / stdlib only.
"""
from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

FORMAT, VERSION = "vitkit-logit-cache", 1
HEADER = "header.json"
IDENTITY = ("k", "num_classes", "teacher", "transform", "samples", "shard_size", "view_seed")  # must all match


class CacheError(ValueError):
    """A cache that cannot be used as it is (corrupt, truncated, incomplete, or written for something else)."""


def record_dtype(k: int) -> np.dtype:
    """`int32 seed | int16 idx[K] | float16 val[K]`, little-endian, packed: `4K + 4` bytes."""
    return np.dtype([("seed", "<i4"), ("idx", "<i2", (k,)), ("val", "<f2", (k,))])


def encode(seeds: np.ndarray, indices: np.ndarray, values: np.ndarray) -> bytes:
    """`(n,)` seeds, `(n, K)` class indices (< 32,768) and `(n, K)` probabilities -> `n·(4K+4)` bytes."""
    n, k = indices.shape
    records = np.empty(n, dtype=record_dtype(k))
    records["seed"], records["idx"], records["val"] = seeds, indices, values
    return records.tobytes()


def decode(blob: bytes, k: int) -> np.ndarray:
    """Bytes -> structured records (fields `seed`, `idx`, `val`); refuses a length that is not whole records."""
    size = record_dtype(k).itemsize
    if len(blob) % size:
        raise CacheError(f"{len(blob)} bytes is not a whole number of {size}-byte records")
    return np.frombuffer(blob, dtype=record_dtype(k))


def shard_seeds(view_seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    """The augmentation seeds `[0, 2^31)` of one shard: drawn from a generator seeded by (view_seed, epoch, shard),
    so a rewritten (resumed) shard draws the same ones."""
    gen = torch.Generator().manual_seed((view_seed * 1_000_003 + epoch) * 1_000_003 + shard)
    return torch.randint(0, 2 ** 31, (count,), generator=gen, dtype=torch.int64).numpy().astype(np.int32)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every RNG a transform may touch (torch, `random`, numpy) seeded from `seed`; the outer states restored."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator (transforms run on CPU); torch.manual_seed
        random.seed(seed), np.random.seed(seed)  # also seeds every accelerator: 0.5 ms per call
        try:
            yield
        finally:
            random.setstate(py), np.random.set_state(npy)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_paths(root: Path, epoch: int, shard: int) -> tuple[Path, Path, Path]:
    base = root / f"epoch_{epoch:04d}" / f"shard_{shard:05d}"
    return base.with_suffix(".bin"), base.with_suffix(".keys"), base.with_suffix(".json")


def check_header(root: Path, wanted: dict) -> Optional[dict]:
    """The saved header, after checking it matches `wanted` on every `IDENTITY` field; None if there is none."""
    path = root / HEADER
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"logit cache {root}: {HEADER} is unreadable ({err}); delete the folder to rewrite it")
    if saved.get("format") != FORMAT or saved.get("version") != VERSION:
        raise CacheError(f"logit cache {root}: not a {FORMAT} v{VERSION} header; use another cache_dir")
    what = {"teacher": "teacher (weights digest)", "transform": "data transform"}
    for key in IDENTITY:
        if wanted.get(key) is not None and saved.get(key) != wanted[key]:
            raise CacheError(f"logit cache {root} was written for another {what.get(key, key)} ({saved.get(key)!r}, "
                             f"now {wanted[key]!r}); use another cache_dir, or delete this one to rewrite it")
    return saved


def shard_complete(root: Path, epoch: int, shard: int) -> bool:
    """Whether the shard's commit file exists (its content is verified when read)."""
    return shard_paths(root, epoch, shard)[2].is_file()


def write_shard(root: Path, epoch: int, shard: int, first: int, records: bytes, keys: list[str]) -> None:
    """Write .bin and .keys atomically, then the commit file with their checksums."""
    from vitkit.io import atomic_write

    bin_path, keys_path, meta_path = shard_paths(root, epoch, shard)
    key_bytes = "".join(f"{k}\n" for k in keys).encode()
    atomic_write(bin_path, lambda tmp: Path(tmp).write_bytes(records))
    atomic_write(keys_path, lambda tmp: Path(tmp).write_bytes(key_bytes))
    meta = {"first": first, "count": len(keys), "sha256": sha256(records), "keys_sha256": sha256(key_bytes)}
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def read_shard(root: Path, epoch: int, shard: int, k: int, keys: list[str]) -> np.ndarray:
    """The verified records of one shard whose samples have the keys `keys`."""
    bin_path, keys_path, meta_path = shard_paths(root, epoch, shard)
    where = f"logit cache {root}, epoch {epoch}, shard {shard}"
    if not meta_path.is_file():
        raise CacheError(f"{where}: incomplete (not written yet, or interrupted); run vk.distill with the teacher "
                         "to finish writing it (it resumes)")
    meta = json.loads(meta_path.read_text())
    if not bin_path.is_file() or not keys_path.is_file():
        raise CacheError(f"{where}: {bin_path.name} or {keys_path.name} is missing; delete {meta_path.name} to "
                         "rewrite the shard")
    blob, key_bytes = bin_path.read_bytes(), keys_path.read_bytes()
    expected = meta["count"] * record_dtype(k).itemsize
    if len(blob) != expected:
        raise CacheError(f"{where}: {bin_path.name} is truncated or padded ({len(blob)} bytes, expected {expected}); "
                         f"delete {meta_path.name} to rewrite the shard")
    if sha256(blob) != meta["sha256"] or sha256(key_bytes) != meta["keys_sha256"]:
        raise CacheError(f"{where}: checksum mismatch (corrupt file); delete {meta_path.name} to rewrite the shard")
    if key_bytes.decode().splitlines() != keys:
        raise CacheError(f"{where}: written for other samples (keys differ from the dataset's); use another "
                         "cache_dir for this data")
    return decode(blob, k)
