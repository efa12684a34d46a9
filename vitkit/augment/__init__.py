"""Training-time augmentations that `vk.fit` applies per batch (kind `augment`): TransMix, ForAug.

An augmentation is applied to a model like any method (`vk.augment(model, "transmix", prob=0.5)`, or
`vitkit train --method transmix:prob=0.5`): it changes no output, it attaches a batch transform that `vk.fit`
runs on every training batch (`mix_batch`). Docs: docs/pretrain.md ("Augmentations: TransMix and ForAug").
"""
from ._common import Mix, attach, mix_batch, refuse_attached

__all__ = ["Mix", "attach", "mix_batch", "refuse_attached"]
