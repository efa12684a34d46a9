"""Grad-CAM on a timm ViT through pytorch-grad-cam, with a reshape that reads the token layout.

Library: `grad-cam` on PyPI (jacobgil/pytorch-grad-cam, MIT). Its ViT recipe,
`pytorch_grad_cam.utils.reshape_transforms.vit_reshape_transform(tensor, height=14, width=14)`, drops exactly one
prefix token and assumes a 14×14 grid, so it raises on register models (`reg_tokens=4`: 4 extra tokens) and at
any other input size. vitkit passes `TokenReshape` instead: at the target layer's forward it records the token
state (prefix count, prompts, the grid of this input, the source map of merged tokens) and turns (B, N, C) tokens
into (B, C, gh, gw); merged tokens are copied back to every patch they stand for.

*Plugs in at.* The library's own forward hook on the target layer (default `blocks[-1].norm1`, the
tutorial's choice); vitkit adds a forward pre-hook on the same layer to snapshot the token state.
*Hand-written here:* only the reshape; the CAM (weights = spatially averaged gradients) is the library's.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from vitkit.models.layout import token_layout


class TokenReshape:
    """pytorch-grad-cam `reshape_transform` for timm ViTs: (B, N, C) -> (B, C, gh, gw) from the token layout.

    Call `snapshot` (a forward pre-hook on the target layer) before the layer runs; the gradient reshape, which
    the library applies during backward, reuses the same snapshot.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layout = token_layout(model)
        self.grid = self.layout.grid_size
        self.num_prefix = self.layout.num_prefix_tokens
        self.source: Optional[torch.Tensor] = None

    def set_input(self, x: torch.Tensor) -> None:
        self.grid = self.layout.grid(tuple(x.shape[-2:]))

    def snapshot(self, module, args) -> None:
        from vitkit.models.runner import get_runner, has_runner

        state = get_runner(self.model).state if has_runner(self.model) else None
        self.num_prefix = self.layout.num_prefix_tokens + (state.num_prompts if state is not None else 0)
        self.source = None if state is None or state.source is None else state.source.clone()
        if state is not None:
            self.grid = tuple(state.grid)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        B, _, C = tokens.shape
        patches = tokens[:, self.num_prefix:]
        if self.source is not None:  # -1: the patch's token was dropped -> zeros
            rel = self.source - self.num_prefix
            patches = patches.gather(1, rel.clamp_min(0).unsqueeze(-1).expand(B, gh * gw, C))
            patches = patches * (rel >= 0).unsqueeze(-1).to(patches.dtype)
        if patches.shape[1] != gh * gw:
            raise NotImplementedError(
                f"gradcam: {patches.shape[1]} tokens for the {gh}x{gw} = {gh * gw} patches and no source map says "
                "which patches each token stands for: the token reduction was applied without keeping it (tome "
                "with unmerge=False), so there is no per-patch map. Apply it with the source map kept (tome: "
                "unmerge=True, the default) to explain the model")
        return patches.reshape(B, gh, gw, C).permute(0, 3, 1, 2)


def gradcam(model: nn.Module, x: torch.Tensor, target: Union[None, int, Sequence[int]] = None, layer: int = -1,
            target_module: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Grad-CAM of `model` on normalised images `x` (B, C, H, W).

    Args:
        target: class index (or one per image); the predicted class when None.
        layer: block whose `norm1` is the target layer (ignored when `target_module` is given).
        target_module: any module whose output is the (B, N, C) token sequence.

    Returns:
        (patch_map (B, gh, gw) raw ReLU'd CAM, heatmap (B, H, W) the library's min-max scaled, resized CAM,
        targets used).
    """
    depth = len(model.blocks)
    if target_module is None and not -depth <= layer < depth:
        raise ValueError(f"gradcam: `layer` {layer} out of range for a model with {depth} blocks")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = target_module if target_module is not None else model.blocks[layer].norm1
    reshape = TokenReshape(model)
    x = x.detach()  # the library sets requires_grad on its input: not on the caller's tensor
    reshape.set_input(x)
    was_training = model.training
    # The library's backward (after its model.zero_grad()) writes parameter gradients: the caller's accumulated
    # `.grad` tensors are set aside (not cloned: backward would add into them in place) and put back after.
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    handle = module.register_forward_pre_hook(reshape.snapshot)
    raw = None
    try:
        with torch.enable_grad(), GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as cam:
            if target is None:
                targets = None
            else:
                ids = [target] * x.shape[0] if isinstance(target, int) else list(target)
                targets = [ClassifierOutputTarget(int(t)) for t in ids]
            heat = cam(input_tensor=x, targets=targets)
            if targets is None:
                ids = cam.outputs.argmax(-1).tolist()
            acts = [a.cpu().numpy() for a in cam.activations_and_grads.activations]
            grads = [g.cpu().numpy() for g in cam.activations_and_grads.gradients]
            raw = cam.get_cam_image(x, module, targets, acts[0], grads[0], False)
    finally:
        handle.remove()
        model.train(was_training)
        for p, g in zip(params, saved):
            p.grad = g
    if raw is None:  # pytorch-grad-cam's context manager swallows (prints) an IndexError from inside
        raise ValueError(f"gradcam: the CAM was not computed (target {target!r}, model output "
                         f"{getattr(model, 'num_classes', '?')} classes); pass a class index of this model")
    patch_map = torch.from_numpy(np.maximum(raw, 0)).float()
    return patch_map, torch.from_numpy(heat).float(), [int(i) for i in ids]
