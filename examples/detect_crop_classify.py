"""Detect → crop → classify (the driver-drowsiness recipe), offline: a face detector finds faces, a ViT classifies
the crops.

1. Classifier: the embedded ViT (`vitkit/vit-tiny-cifar`) gets a 2-class head and is fine-tuned (LoRA + head,
   `vk.fit`) on scikit-image's `lfw_subset`: 100 LFW face crops and 100 non-face patches (25 × 25 grey). Held out:
   the last 30 of each class. Several seeds; held-out accuracy mean ± std.
2. Detector: scikit-image's LBP frontal-face cascade (`vk.data.lbp_face_detector`; no AGPL YOLO) on the
   `astronaut` photo; each detection is cropped (`vk.data.detect_crops`, 10 % padding) and classified
   (`vk.data.classify_crops`), beside a crop of the same size from the photo's background for contrast.

What is *not* demonstrated: the drowsiness label itself (eyes open / closed) — no eye-state data ships offline.

    OMP_NUM_THREADS=2 python examples/detect_crop_classify.py
    OMP_NUM_THREADS=1 python examples/detect_crop_classify.py --epochs 1 --seeds 0      # smoke
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import tempfile

import numpy as np
import torch
from skimage.data import astronaut, lfw_subset

import vitkit as vk

CLASSES = ["not a face", "face"]


def train_classifier(seed: int, epochs: int):
    faces = lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
    labels = [1] * 100 + [0] * 100
    train_idx = [i for i in range(200) if i % 100 < 70]
    test_idx = [i for i in range(200) if i % 100 >= 70]
    torch.manual_seed(seed)
    model = vk.load("vitkit/vit-tiny-cifar", num_classes=2)
    vk.adapt(model, "lora")
    train = vk.data.arrays(faces[train_idx], [labels[i] for i in train_idx], CLASSES,
                           transform=vk.data.transform(model, train=True))
    test = vk.data.arrays(faces[test_idx], [labels[i] for i in test_idx], CLASSES, transform=vk.data.transform(model))
    with tempfile.TemporaryDirectory() as run:
        vk.fit(model, train, epochs=epochs, batch_size=32, seed=seed, out_dir=run, progress=False, save_model=False)
    return model, vk.evaluate(model, test)["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    accuracies, model = [], None
    for seed in args.seeds:
        model, top1 = train_classifier(seed, args.epochs)
        accuracies.append(top1)
        print(f"seed {seed}: face / not-a-face held-out top-1 {top1:.3f}")
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    print(f"classifier: top-1 {statistics.mean(accuracies):.3f} ± {std:.3f} over {len(accuracies)} seed(s) "
          f"(60 held-out crops, chance 0.500)")

    photo = astronaut()
    grey = (photo.mean(-1)).astype(np.uint8)  # lfw_subset is grey: classify grey crops
    detector = vk.data.lbp_face_detector(min_size=(60, 60), max_size=(160, 160))
    rows = vk.data.classify_crops(model, grey, detector, pad=0.1, classes=CLASSES)
    for row in rows:
        b = row["box"]
        print(f"detected at x={b.x} y={b.y} ({b.width}x{b.height}): {row['label']} (p(face) = {row['probs'][1]:.2f})")
    if rows:
        b = rows[0]["box"]
        background = vk.data.classify_crops(model, grey, lambda a: [(400, 380, b.width, b.height)], classes=CLASSES)
        bg = background[0]
        print(f"background crop at x=400 y=380: {bg['label']} (p(face) = {bg['probs'][1]:.2f})")
    else:
        print("no face detected")


if __name__ == "__main__":
    main()
