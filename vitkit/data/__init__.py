"""Data for vitkit (`vk.data`): image folders, in-memory arrays, offline datasets, model transforms, splits.

    import vitkit as vk
    ds = vk.data.image_folder("cifar10-test-jpeg/test", preload=True)
    parts = vk.data.split(ds, seed=None, train=800, test=200)     # documented split: first 800 / last 200 per class
    train = parts["train"].with_transform(vk.data.transform(model, train=True))
    test = parts["test"].with_transform(vk.data.transform(model))
    digits = vk.data.digits()                                      # scikit-learn, 8x8 grey: resized, expanded
"""
from .datasets import (DATASETS, ArrayDataset, CorruptImageError, ImageFolder, Subset, VisionDataset, arrays,
                       cifar10_jpeg, digits, get, image_folder, read_image)
from .crops import Box, classify_crops, detect_crops, lbp_face_detector
from .splits import few_shot, split
from .transforms import Prepare, data_config, map_point, transform
from .tensors import TensorDataset, tensors  # clips, tiles, point clouds: the input adapters' samples
from .generators import procedural  # sounds, tiles, clips, pairs, points: generated tasks of those inputs

__all__ = ["ArrayDataset", "CorruptImageError", "ImageFolder", "Subset", "VisionDataset", "DATASETS", "arrays",
           "cifar10_jpeg", "digits", "get", "image_folder", "read_image", "few_shot", "split", "Prepare",
           "data_config", "map_point", "transform", "Box", "classify_crops", "detect_crops", "lbp_face_detector",
           "TensorDataset", "tensors", "procedural"]
