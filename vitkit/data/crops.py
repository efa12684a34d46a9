"""Detect → crop → classify: a detector's boxes become the images a ViT classifies (`vk.data.detect_crops`).

The driver-drowsiness paper (ViT + YOLOv5) finds the face with a detector, crops it and classifies the crop with a
ViT. vitkit takes **any detector callable** — image array in, boxes out — so the detector is the user's choice.
The offline default is scikit-image's LBP frontal-face cascade (`lbp_face_detector`, BSD licence); YOLOv5 is not
used (AGPL-3.0, weights from a hub). Spec: `../shared/methods/applications.md` entry 13.

    detector = vk.data.lbp_face_detector(min_size=(60, 60))
    for box, crop in vk.data.detect_crops(image, detector, pad=0.1):   # PIL crops, clipped to the image
        ...
    rows = vk.data.classify_crops(model, image, detector)              # [{"box", "label", "probs"}, ...]

A detector may return `Box`es, (x, y, width, height) tuples or scikit-image's dicts (`r`, `c`, `width`,
`height`). Hand-written glue: the crop geometry (padding, clipping) is a few lines and no library joins an
arbitrary detector to a timm classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Box:
    """A detection in pixels: top-left corner (x = column, y = row), width and height."""

    x: int
    y: int
    width: int
    height: int


def _as_box(item) -> Box:
    if isinstance(item, Box):
        return item
    if isinstance(item, dict) and {"r", "c", "width", "height"} <= set(item):
        return Box(int(item["c"]), int(item["r"]), int(item["width"]), int(item["height"]))
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return Box(*(int(round(float(v))) for v in item))
    raise ValueError(f"detect_crops: a detector returned {item!r}; boxes must be vk.data.Box, (x, y, width, "
                     f"height) or scikit-image dicts with r, c, width, height")


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"detect_crops: expected an image (H, W) or (H, W, C), got shape {array.shape}")
    return array


def lbp_face_detector(scale_factor: float = 1.2, step_ratio: float = 1.0, min_size: tuple[int, int] = (24, 24),
                      max_size: Optional[tuple[int, int]] = None) -> Callable[[np.ndarray], list[Box]]:
    """scikit-image's LBP frontal-face cascade (offline) as a detector: image array -> face boxes."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    cascade = Cascade(lbp_frontal_face_cascade_filename())

    def detect(image: np.ndarray) -> list[Box]:
        size = max_size or image.shape[:2]
        found = cascade.detect_multi_scale(img=image, scale_factor=scale_factor, step_ratio=step_ratio,
                                           min_size=min_size, max_size=size)
        return [_as_box(d) for d in found]

    return detect


def detect_crops(image, detector: Callable[[np.ndarray], Iterable], *, pad: float = 0.0) -> list[tuple[Box, Image.Image]]:
    """(box, crop) for every box `detector(image)` returns; each side grows by `pad` × the box size, clipped."""
    if pad < 0:
        raise ValueError(f"detect_crops: `pad` must be >= 0, got {pad!r}")
    array = _as_array(image)
    h, w = array.shape[:2]
    out = []
    for box in map(_as_box, detector(array)):
        dx, dy = round(box.width * pad), round(box.height * pad)
        x0, y0 = max(0, box.x - dx), max(0, box.y - dy)
        x1, y1 = min(w, box.x + box.width + dx), min(h, box.y + box.height + dy)
        if x1 <= x0 or y1 <= y0:
            continue  # a box outside the image
        crop = Box(x0, y0, x1 - x0, y1 - y0)
        out.append((crop, Image.fromarray(np.ascontiguousarray(array[y0:y1, x0:x1]))))
    return out


def classify_crops(model, image, detector: Callable[[np.ndarray], Iterable], *, pad: float = 0.0,
                   classes: Optional[Sequence[str]] = None) -> list[dict]:
    """Detect, crop and classify: one dict per detection with `box`, `label` (top class) and `probs`."""
    import torch

    from .transforms import transform

    crops = detect_crops(image, detector, pad=pad)
    if not crops:
        return []
    prepare = transform(model)
    batch = torch.stack([prepare(crop) for _, crop in crops])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    model.train(was_training)
    rows = []
    for (box, _), p in zip(crops, probs):
        top = int(p.argmax())
        rows.append({"box": box, "label": classes[top] if classes else top, "probs": p.tolist()})
    return rows
