"""Datasets: image folders, in-memory arrays and datasets that ship inside dependencies (offline).

Every dataset here yields `(image, label)` where `image` is a PIL image until a transform is attached
(`with_transform`, or `transform=` at construction), and exposes `targets` (one int label per sample) and
`classes` (names), which splits, samplers and evaluation read without decoding any image.

Hand-written because torchvision's `ImageFolder` neither names a corrupt file in its error nor can skip and
count unreadable files; the rest (PIL decoding, timm transforms) is the libraries'.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

_log = logging.getLogger("vitkit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class CorruptImageError(ValueError):
    """An image file could not be decoded; the message names the file and what to do.

    torch's DataLoader re-raises an error of a worker process as `CorruptImageError(<the worker's traceback>)`;
    the message is cut back to its last line here, so the error stays one line naming the file.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if "\nOriginal Traceback" in message:  # a DataLoader worker's re-raise
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(("CorruptImageError", "vitkit.")) else last
        super().__init__(message)


class VisionDataset(torch.utils.data.Dataset):
    """Base class: `targets`, `classes`, an optional `transform`, and `with_transform` (a shallow copy)."""

    targets: list[int]
    classes: list[str]
    transform: Optional[Callable]

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> Image.Image:
        """The untransformed image at `index` (PIL)."""
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.raw(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def with_transform(self, transform: Optional[Callable]) -> "VisionDataset":
        """The same samples with another transform (the images are shared, not copied)."""
        other = copy.copy(self)
        other.transform = transform
        return other


def read_image(path: str | os.PathLike, hint: str = "replace or remove the file") -> Image.Image:
    """Decode the image file `path` fully (PIL decodes lazily: a truncated file would fail later, elsewhere).

    Raises `FileNotFoundError` for a missing file and `CorruptImageError` (a `ValueError`) naming the file, why
    it cannot be read and `hint`, for a truncated file or one that is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist" if not path.exists() else
                                f"{path} is not an image file (a folder?)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        why = "not an image PIL can decode"
    except (OSError, SyntaxError, ValueError) as err:
        why = f"truncated or corrupt ({type(err).__name__}: {err})"
    raise CorruptImageError(f"cannot read image {path}: {why}; {hint}")


_FOLDER_HINT = "replace or remove the file, or load the folder with skip_bad=True (CLI: --skip-bad) to drop it"


def _read_image(path: Path) -> Image.Image:
    return read_image(path, _FOLDER_HINT)


class ImageFolder(VisionDataset):
    """Images in `root/<class>/*.<ext>`, classes sorted by name, files sorted by name within a class.

    Args:
        root: the folder holding one sub-folder per class.
        transform: applied to each PIL image (see `vitkit.data.transform`).
        skip_bad: decode every file once now and drop unreadable ones (counted in `num_skipped`, listed in
            `skipped`, logged); when False a corrupt file raises `CorruptImageError` naming it when read.
        preload: keep the decoded images in memory (small datasets such as CIFAR: decoding once, not per epoch).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None, *, skip_bad: bool = False,
                 preload: bool = False):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders; expected root/<class>/<image>")
        self.files: list[Path] = []
        self.targets = []
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append(path)
                    self.targets.append(label)
        if not self.files:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.transform = transform
        self.skipped: list[Path] = []
        self._cache: Optional[list[Image.Image]] = None
        if skip_bad or preload:
            self._scan(skip_bad, preload)

    def _scan(self, skip_bad: bool, preload: bool) -> None:
        files, targets, cache = [], [], []
        for path, label in zip(self.files, self.targets):
            try:
                image = _read_image(path)
            except CorruptImageError:
                if not skip_bad:
                    raise
                self.skipped.append(path)
                continue
            files.append(path)
            targets.append(label)
            if preload:
                cache.append(image)
        self.files, self.targets = files, targets
        self._cache = cache if preload else None
        if self.skipped:
            _log.warning("%s: skipped %d unreadable image(s), e.g. %s", self.root, len(self.skipped),
                         ", ".join(str(p) for p in self.skipped[:3]))

    @property
    def num_skipped(self) -> int:
        """How many unreadable files `skip_bad=True` dropped."""
        return len(self.skipped)

    def raw(self, index: int) -> Image.Image:
        if self._cache is not None:
            return self._cache[index]
        return _read_image(self.files[index])

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root}, {len(self)} images, {len(self.classes)} classes"
                + (f", {self.num_skipped} skipped" if self.skipped else "") + ")")


class ArrayDataset(VisionDataset):
    """In-memory images: an array `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)` with labels `(N,)`.

    Integer arrays are read as 0-255 pixels; float arrays as 0-1 unless `value_range` says otherwise (for
    example `(0, 16)` for scikit-learn digits). Images are turned into PIL images on access, so the same
    model transforms apply as for files.
    """

    def __init__(self, images, labels: Sequence[int], classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None, *, value_range: Optional[tuple[float, float]] = None,
                 channels_last: Optional[bool] = None):
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels).astype(int)
        if array.ndim not in (3, 4) or len(array) != len(labels):
            raise ValueError(f"ArrayDataset: expected images (N, H, W[, C]) or (N, C, H, W) and N labels, got "
                             f"images {array.shape} and {len(labels)} labels")
        if array.ndim == 4:
            if channels_last is None:  # (N, C, H, W) when the second axis is a plausible channel count
                channels_last = not (array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3))
            if not channels_last:
                array = array.transpose(0, 2, 3, 1)
            if array.shape[-1] == 1:
                array = array[..., 0]
            elif array.shape[-1] != 3:
                raise ValueError(f"ArrayDataset: images need 1 or 3 channels, got shape {array.shape}")
        if array.dtype != np.uint8:
            low, high = value_range or ((0.0, 255.0) if np.issubdtype(array.dtype, np.integer) else (0.0, 1.0))
            array = np.clip((array.astype(np.float64) - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        self.images = np.ascontiguousarray(array)
        self.targets = labels.tolist()
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
        self.transform = transform

    def raw(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def __repr__(self) -> str:
        return f"ArrayDataset({len(self)} images {self.images.shape[1:]}, {len(self.classes)} classes)"


class Subset(VisionDataset):
    """A view on `indices` of `dataset` that keeps `targets`, `classes` and its own transform."""

    def __init__(self, dataset: VisionDataset, indices: Sequence[int], transform: Optional[Callable] = None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = [dataset.targets[i] for i in self.indices]
        self.classes = dataset.classes
        self.transform = transform if transform is not None else dataset.transform

    def raw(self, index: int) -> Image.Image:
        return self.dataset.raw(self.indices[index])

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.dataset!r})"


def image_folder(root: str | os.PathLike, transform: Optional[Callable] = None, *, skip_bad: bool = False,
                 preload: bool = False) -> ImageFolder:
    """`root/<class>/*.jpg` as a dataset (see `ImageFolder`)."""
    return ImageFolder(root, transform, skip_bad=skip_bad, preload=preload)


def arrays(images, labels: Sequence[int], classes: Optional[Sequence[str]] = None, **kwargs) -> ArrayDataset:
    """In-memory images and labels as a dataset (see `ArrayDataset`)."""
    return ArrayDataset(images, labels, classes, **kwargs)


def digits(transform: Optional[Callable] = None) -> ArrayDataset:
    """scikit-learn's handwritten digits (1,797 grey 8x8 images, 10 classes), shipped in the wheel: offline.

    The images stay 8x8 grey here; `vitkit.data.transform(model)` resizes and channel-expands them, and
    says so in the log.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return ArrayDataset(bunch.images, bunch.target, [str(i) for i in range(10)], transform, value_range=(0, 16))


def digits_tensors(n_train: int = 1000, n_test: int = 500, seed: int = 0):
    """The digits as a ready task for a 32 px, 3-channel model: (train, test) `torch.utils.data.TensorDataset`s.

    scikit-learn's 1,797 grey 8x8 images shuffled with `seed`, upsampled to 32x32 (bilinear), 3 channels,
    normalised with mean = std = 0.5; the first `n_train` of the shuffle train, the next `n_test` are held out
    (the PEFT learning tests' and `benchmarks/adapt_compare.py`'s task).
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return torch.utils.data.TensorDataset(x[tr], y[tr]), torch.utils.data.TensorDataset(x[te], y[te])


def cifar10_jpeg(root: str | os.PathLike, transform: Optional[Callable] = None, *, preload: bool = True,
                 skip_bad: bool = False) -> ImageFolder:
    """The CIFAR-10 test JPEGs (`root/<class>/NNNN.jpg`), preloaded (10,000 32x32 images, ~31 MB decoded)."""
    return ImageFolder(root, transform, skip_bad=skip_bad, preload=preload)


DATASETS = {"digits": digits}  # name -> factory for datasets that ship inside dependencies


def get(name_or_path: str | os.PathLike, **kwargs) -> VisionDataset:
    """A dataset by name (`digits`) or an image folder path (used by the CLI and recipes)."""
    if str(name_or_path) in DATASETS:
        return DATASETS[str(name_or_path)](**kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ImageFolder(path, **kwargs)
    raise ValueError(f"unknown dataset `{name_or_path}`: not a folder and not one of {', '.join(DATASETS)}")
