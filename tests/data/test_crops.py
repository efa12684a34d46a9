"""Detect -> crop -> classify: crops equal numpy slices of the image (padding, clipping, box formats), the LBP
cascade finds the astronaut's face offline, and each crop's probabilities are the model's on that crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit as vk


def _image():
    return (np.arange(40 * 50 * 3) % 251).reshape(40, 50, 3).astype(np.uint8)


def test_crops_are_the_padded_clipped_slices():
    image = _image()
    boxes = [vk.data.Box(10, 5, 20, 10), (0, 0, 8, 8), {"r": 30, "c": 44, "width": 10, "height": 20}]
    crops = vk.data.detect_crops(image, lambda a: boxes, pad=0.5)
    got = [(b.x, b.y, b.width, b.height) for b, _ in crops]
    # x0 = x - pad*w, clipped to [0, W]; y likewise
    assert got == [(0, 0, 40, 20), (0, 0, 12, 12), (39, 20, 11, 20)]
    for (box, crop) in crops:
        np.testing.assert_array_equal(np.asarray(crop), image[box.y:box.y + box.height, box.x:box.x + box.width])
    assert vk.data.detect_crops(image, lambda a: [(60, 50, 5, 5)]) == []  # outside the image


def test_the_lbp_cascade_finds_the_astronauts_face():
    from skimage.data import astronaut

    boxes = vk.data.lbp_face_detector(min_size=(60, 60), max_size=(123, 123))(astronaut())
    assert len(boxes) == 1
    box = boxes[0]
    assert 150 < box.x + box.width / 2 < 250 and 80 < box.y + box.height / 2 < 160  # her face, top middle


def test_classified_crops_carry_the_models_probabilities_of_each_crop():
    torch.manual_seed(0)
    model = vk.load("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1,
                    num_heads=2, num_classes=3)
    image = _image()
    rows = vk.data.classify_crops(model, image, lambda a: [(10, 5, 20, 10), (0, 0, 32, 32)],
                                  classes=["a", "b", "c"])
    prepare = vk.data.transform(model)
    for row, (x, y, w, h) in zip(rows, [(10, 5, 20, 10), (0, 0, 32, 32)]):
        from PIL import Image

        want = model(prepare(Image.fromarray(image[y:y + h, x:x + w]))[None]).softmax(-1)[0]
        torch.testing.assert_close(torch.tensor(row["probs"]), want)
        assert row["label"] == "abc"[int(want.argmax())]
    assert vk.data.classify_crops(model, image, lambda a: []) == []


def test_bad_detections_are_refused():
    with pytest.raises(ValueError, match="boxes must be"):
        vk.data.detect_crops(_image(), lambda a: ["face"])
    with pytest.raises(ValueError, match="pad"):
        vk.data.detect_crops(_image(), lambda a: [], pad=-1)
    with pytest.raises(ValueError, match="expected an image"):
        vk.data.detect_crops(np.zeros((2, 2, 2, 2)), lambda a: [])
